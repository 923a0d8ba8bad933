"""The GPU-window plumbing of tools/bench.py: error rows, the lever table, --dry-run (never a timing assertion);
prompt-set generation with ours as ldm-eval runs it, the both-compiled training row alone, the compiled levers alone."""
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
    assert [line["config"] for line in lines] == [lever.name for lever in benchmarks.COMPILED_LEVERS]
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
    assert configs[-len(benchmarks.COMPILED_LEVERS):] == [lever.name for lever in benchmarks.COMPILED_LEVERS]
    fp8 = next(json.loads(line) for line in levers.read_text().splitlines() if "FP8" in json.loads(line)["config"])
    assert fp8["ours_ms"] > 0 and 0 < fp8["fp8_change"] < 0.2  # the FP8 lever ran, and says how much it changed
    lines = [json.loads(line) for line in levers.read_text().splitlines()]
    norms = [line for line in lines if "Triton GroupNorm" in line["config"]]
    assert len(norms) == 4 and all(line["ours_ms"] > 0 for line in norms), "the Triton GroupNorm levers ran"
    assert all(line["group_norm_change"] == 0.0 for line in norms), "on the CPU the fused norms are the reference"
    sums = [line for line in lines if "per-channel sums" in line["config"]]
    assert len(sums) == 2 and all(line["ours_ms"] > 0 for line in sums), "the channel-sums levers ran"
    # traced by dynamo (the eager backend) the norms ran as channel sums: the same within bf16's rounding (~0.6%)
    assert all(0 <= line["group_norm_change"] < 0.05 for line in sums)
    attention = [line for line in lines if "cuDNN attention" in line["config"]]
    assert len(attention) == 2 and all(line["ours_ms"] > 0 for line in attention), "the cuDNN attention levers ran"
    # on the CPU no SDPA kernel preference applies: the same attention, traced by dynamo
    assert all(0 <= line["attention_change"] < 1e-5 for line in attention)


def _bench(**kwargs):
    return benchmarks.Bench(torch.device("cpu"), "test", backend="eager", tiny=True, **kwargs)


def _generate(b, recorded):
    return benchmarks.eval_generate(b, prompts=4, steps=2, batches=(2, 4), record=recorded.append)


@pytest.mark.slow
def test_eval_generate_records_the_eager_row_then_ours_compiled_against_the_peer_at_its_best():
    pytest.importorskip("diffusers")  # the peer
    recorded = []
    row = _generate(_bench(), recorded)
    (eager,) = recorded
    assert eager.benchmark == row.benchmark == "eval_generate_sd15_512_2steps" and row.unit == "images/s"
    assert eager.details["compiled"] is False and "note" in eager.details
    assert set(eager.details["images_s_by_batch"]["ours"]) == {"2", "4"}
    assert eager.ours == max(eager.details["images_s_by_batch"]["ours"].values())

    d = row.details
    assert d["compiled"] is True and d["mode"] == "reduce-overhead" and "dry_run" in d
    for side in ("ours", "peer"):  # every batch size timed compiled, its compile seconds kept
        assert set(d["images_s_by_batch"][side]) == set(d["compile_s"][side]) == {"2", "4"}
        assert all(isinstance(v, float) and v > 0 for v in d["images_s_by_batch"][side].values())
    assert row.ours == max(d["images_s_by_batch"]["ours"].values())
    assert d["eager"]["images_s"] == {"ours": eager.ours, "peer": eager.peer}
    modes = d["peer_modes"]
    assert set(modes) == {"eager", "reduce-overhead"} and row.peer == max(modes.values())
    assert row.peer_name.endswith(", eager" if row.peer == modes["eager"] else "torch.compile(reduce-overhead)")
    assert row.speedup == pytest.approx(row.ours / row.peer)


@pytest.mark.slow
def test_eval_generate_skips_the_peers_compile_the_budget_cannot_hold(monkeypatch):
    pytest.importorskip("diffusers")  # the peer
    b = _bench()
    real = benchmarks.diffusers_fast

    def budget_spent(*args, **kwargs):  # the budget runs out as the peer's compile would start
        b.deadline = time.monotonic() - 1
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmarks, "diffusers_fast", budget_spent)
    recorded = []
    row = _generate(b, recorded)
    d = row.details
    assert all(isinstance(v, float) for v in d["images_s_by_batch"]["ours"].values())
    assert all(v.startswith("skipped") for v in d["images_s_by_batch"]["peer"].values())
    assert d["peer_modes"]["reduce-overhead"].startswith("not measured") and row.peer == d["peer_modes"]["eager"]
    assert row.peer_name.endswith(", eager") and d["best_batch"]["peer"] == recorded[0].details["best_batch"]["peer"]


@pytest.mark.slow
def test_eval_generate_eager_or_out_of_budget_writes_only_the_eager_row():
    for b in (_bench(mode=None, peer=False), _bench(peer=False, deadline=time.monotonic() - 1)):
        recorded = []
        row = _generate(b, recorded)
        assert recorded == [] and row.details["compiled"] is False and row.ours > 0 and row.peer is None
        assert ("compiled_skipped" in row.details) == (b.mode is not None)


@pytest.mark.slow
def test_training_can_start_at_the_both_compiled_row(tmp_path):
    pytest.importorskip("diffusers")  # the peer
    out = tmp_path / "results.jsonl"
    assert _bench_tool().main(["--dry-run", "--out", str(out), "--only", "train_sd15_unet_256", "--batch-256", "2",
                               "--train-both-compiled"]) == 0
    (row,) = read_rows(out)
    d = row["details"]
    assert row["ours"] > 0 and row["peer"] > 0 and row["peer_name"].endswith("(torch.compile)")
    assert d["compile"] is True and set(d["compile_s"]) == {"ours", "peer"} and "eager_img_s" not in d


@pytest.mark.slow
def test_the_compiled_levers_alone_write_no_row(tmp_path, capsys):
    pytest.importorskip("diffusers")  # the peer's levers
    out, levers = tmp_path / "results.jsonl", tmp_path / "levers.jsonl"
    tool = _bench_tool()
    assert tool.main(["--dry-run", "--out", str(out), "--only", "unet_step_sd15_512_b1_cfg",
                      "--compiled-levers-only"]) == 2 and "--levers" in capsys.readouterr().err
    assert tool.main(["--dry-run", "--out", str(out), "--only", "unet_step_sd15_512_b1_cfg", "--levers", str(levers),
                      "--compiled-levers-only"]) == 0
    lines = [json.loads(line) for line in levers.read_text().splitlines()]
    assert not out.exists()
    assert [line["config"] for line in lines] == [lever.name for lever in benchmarks.COMPILED_LEVERS]
    peer = {lever.name for lever in benchmarks.COMPILED_LEVERS if lever.peer}
    assert peer and all(line["dry_run"] for line in lines)
    # ours' levers time ours; the peer's (diffusers' U-Net compiled in its modes) time the peer, and say so
    assert all(line["ours_ms"] > 0 and line["peer_ms"] is None for line in lines if line["config"] not in peer)
    assert all(line["ours_ms"] is None and line["peer_ms"] > 0 and line["side"] == "peer"
               for line in lines if line["config"] in peer)


def test_eval_batches_picks_the_prompt_set_batch_sizes_and_refuses_a_zero(tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.jsonl"
    tool = _bench_tool()
    assert tool.main(["--dry-run", "--out", str(out), "--only", "eval_generate_sd15_512_25steps",
                      "--eval-batches", "0"]) == 2
    assert "--eval-batches" in capsys.readouterr().err and not out.exists()
    seen = {}

    def fake_eval_generate(b, **kwargs):  # what the tool asks for, without generating
        seen.update(kwargs)
        return b.row("eval_generate_sd15_512_25steps", 1.0, None, None, "images/s", None, {})

    monkeypatch.setattr(tool.bench, "eval_generate", fake_eval_generate)
    assert tool.main(["--dry-run", "--out", str(out), "--only", "eval_generate_sd15_512_25steps",
                      "--eval-batches", "4", "16"]) == 0
    assert seen["batches"] == (4, 16) and len(read_rows(out)) == 1


@pytest.mark.slow
def test_activation_checkpointing_recomputes_both_sides_blocks_and_counts_model_flops(monkeypatch):
    pytest.importorskip("diffusers")  # the peer
    from ldm.models import unet_blocks

    calls = []
    real = unet_blocks.checkpoint
    monkeypatch.setattr(unet_blocks, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    plain = benchmarks.train(_bench(), 256, 2, compile_=False)
    assert calls == [] and "activation_checkpointing" not in plain.details
    row = benchmarks.train(_bench(checkpointing=True), 256, 2, compile_=False)
    assert calls, "ours ran its blocks under checkpoint"
    assert "both sides" in row.details["activation_checkpointing"]
    assert row.details["flops_per_step"] == plain.details["flops_per_step"]  # MFU counts the model's FLOPs only
    assert row.ours > 0 and row.peer > 0
