"""The GPU-window plumbing of tools/bench.py: error rows, the lever table, --dry-run (never a timing assertion)."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.bench import benchmarks
from ldm.bench.record import read_rows

ROOT = Path(__file__).resolve().parents[1]


def _bench_tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__("bench")
    finally:
        sys.path.pop(0)


def test_a_failing_benchmark_writes_an_error_row_and_the_next_still_runs(tmp_path, monkeypatch):
    def broken(b):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(benchmarks, "unet_step", broken)
    monkeypatch.setattr(benchmarks, "vae_encode",
                        lambda b, batch: b.row("vae_encode_256", 10.0, 9.0, "peer", "img/s", None, {"batch": batch}))
    out = tmp_path / "results.jsonl"
    assert _bench_tool().main(["--dry-run", "--no-peer", "--out", str(out),
                               "--only", "unet_step_sd15_512_b1_cfg", "vae_encode_256"]) == 0
    failed, done = read_rows(out)
    assert failed["benchmark"] == "unet_step_sd15_512_b1_cfg" and failed["ours"] is None
    assert failed["unit"] == "ms" and failed["details"]["error"] == "RuntimeError: out of memory"
    assert done["benchmark"] == "vae_encode_256" and done["ours"] == 10.0 and done["details"]["batch"] == 2
    assert "dry_run" in done["details"] and done["device"].startswith("cpu")


def test_compiled_levers_the_budget_cannot_hold_are_written_as_skipped(tmp_path):
    levers = tmp_path / "levers.jsonl"
    b = benchmarks.Bench(torch.device("cpu"), "test", peer=False, backend="eager", tiny=True, levers=levers,
                         deadline=time.monotonic() + 30)
    benchmarks.compiled_levers(b)
    lines = [json.loads(line) for line in levers.read_text().splitlines()]
    assert [line["config"] for line in lines] == [name for name, *_ in benchmarks.COMPILED_LEVERS]
    assert all(line["ours_ms"] is None and "needs" in line["skipped"] and line["dry_run"] for line in lines)


@pytest.mark.slow
def test_dry_run_takes_every_path_of_the_guided_step_and_its_levers(tmp_path):
    out, levers = tmp_path / "results.jsonl", tmp_path / "levers.jsonl"
    assert _bench_tool().main(["--dry-run", "--out", str(out), "--levers", str(levers),
                               "--only", "unet_step_sd15_512_b1_cfg"]) == 0
    (row,) = read_rows(out)
    assert row["benchmark"] == "unet_step_sd15_512_b1_cfg" and row["ours"] > 0 and row["details"]["latent"] == 8
    configs = [json.loads(line)["config"] for line in levers.read_text().splitlines()]
    assert configs[:3] == ["eager, NCHW, separate q/k/v, all-True context mask, SDPA default",
                           "+ channels_last (NHWC)", "+ fused q|k|v"]
    assert configs[-3:] == [name for name, *_ in benchmarks.COMPILED_LEVERS]
