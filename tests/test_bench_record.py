"""The benchmark record: its JSON lines, the FLOP counts and the MFU maths (never a timing assertion)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_to_ref, tiny_components, unet_inputs
from torch import nn

from ldm.bench import benchmarks
from ldm.bench.flops import count_flops, matmul_flops, mfu, mfu_from_throughput
from ldm.bench.models import diffusers_unet, diffusers_vae, redraw_zero_init_
from ldm.bench.record import FIELDS, append_rows, make_row, read_rows, row_json, speedup
from ldm.bench.timing import alternate
from ldm.errors import LdmError
from ldm.models.attention import attention_backend
from ldm.models.transformer import SpatialTransformer
from ldm.pipeline.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def _row(name="unet_step_sd15_512_b1_cfg", ours=7.0, peer=7.5, unit="ms"):
    return make_row(name, ours, peer, "diffusers", unit, mfu=0.25, device="cpu", command="python tools/bench.py")


def test_a_row_holds_the_fixed_fields_in_order_and_its_details():
    row = _row()
    row.details["batch"] = 2
    data = json.loads(row_json(row))
    assert list(data) == [*FIELDS, "details"]
    assert data["benchmark"] == "unet_step_sd15_512_b1_cfg" and data["unit"] == "ms" and data["details"] == {"batch": 2}
    assert data["torch"] == torch.__version__ and data["date"].endswith("+00:00") and data["device"].startswith("cpu")
    assert "details" not in json.loads(row_json(_row()))  # no empty details


def test_speedup_is_above_one_when_ours_is_faster_whatever_the_unit():
    assert speedup(7.0, 14.0, "ms") == 2.0 and speedup(0.5, 0.25, "s") == 0.5
    assert speedup(510.0, 340.0, "img/s") == pytest.approx(1.5) and speedup(3.0, 6.0, "images/s") == 0.5
    assert speedup(7.0, None, "ms") is None and speedup(None, 7.0, "ms") is None
    assert _row(ours=8.0, peer=10.0).speedup == pytest.approx(1.25)


def test_every_run_appends_and_keeps_the_older_rows(tmp_path):
    path = tmp_path / "docs" / "benchmarks" / "results.jsonl"
    append_rows(path, [_row(ours=7.0)])
    path.write_text(path.read_text().rstrip("\n"))  # a file whose last line lost its newline still appends cleanly
    append_rows(path, [_row(ours=6.0), _row("vae_encode_256", 900.0, 700.0, "img/s")])
    rows = read_rows(path)
    assert [r["ours"] for r in rows] == [7.0, 6.0, 900.0]
    assert rows[2]["speedup"] == pytest.approx(900 / 700)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(LdmError, match=r"results.jsonl:4: not a JSON line"):
        read_rows(path)


def test_nan_never_reaches_the_record(tmp_path):
    with pytest.raises(ValueError):
        append_rows(tmp_path / "r.jsonl", [_row(ours=float("nan"))])


def test_flops_of_a_linear_and_a_convolution_are_the_textbook_counts():
    x = torch.randn(5, 7)
    linear = nn.Linear(7, 3)
    assert count_flops(lambda: linear(x)) == matmul_flops(5, 3, 7) == 2 * 5 * 3 * 7
    conv, image = nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 8, 8)
    assert count_flops(lambda: conv(image)) == 2 * (2 * 8 * 8) * 6 * (4 * 3 * 3)
    # backward: twice the forward's products (the input's and the weight's gradients)
    assert count_flops(lambda: conv(image.requires_grad_()).sum().backward()) == 3 * 2 * (2 * 8 * 8) * 6 * 36


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_flops_are_counted(backend):
    block = SpatialTransformer(64, heads=2, dim_head=32, context_dim=16).eval()
    x, context = torch.randn(1, 64, 4, 4), torch.randn(1, 5, 16)
    n, m, d = 16, 5, 64
    projections = 2 * (3 * n * d * d + n * d * d  # self-attention q, k, v, out
                       + n * d * d + 2 * m * 16 * d + n * d * d  # cross-attention q, k, v (from the context), out
                       + n * d * 8 * d + n * 4 * d * d  # GEGLU (d -> 2 x 4d) and the MLP's output (4d -> d)
                       + 2 * n * d * d)  # proj_in, proj_out (1x1 convolutions)
    scores = 2 * 2 * (n * n * d) + 2 * 2 * (n * m * d)  # q k^T and p v, self and cross
    with torch.no_grad(), attention_backend(backend):
        assert count_flops(lambda: block(x, context)) == projections + scores
    # backward: two products per forward product (the input's and the weight's gradients), one for the cross-
    # attention's k, v (the context needs no gradient); the fused SDPA backward recomputes the scores: 2.5x
    key_values = 2 * 2 * m * 16 * d
    backward_scores = 2.5 * scores if backend == "sdpa" else 2 * scores
    with attention_backend(backend):
        total = count_flops(lambda: block(x.requires_grad_(), context).sum().backward())
    assert total == 3 * projections - key_values + scores + backward_scores


def test_mfu_maths():
    assert mfu(1e12, 0.01, 1e15) == pytest.approx(0.1)
    # 500 img/s of 3 TFLOP each on a 1.5 PFLOP/s device: all of it
    assert mfu_from_throughput(3e12, 500.0, 1.5e15) == pytest.approx(1.0)
    assert math.isclose(mfu_from_throughput(1.6e12 / 2, 1 / 0.005 * 2, 790e12), 1.6e12 / 0.005 / 790e12)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 1e15)


def test_alternate_interleaves_the_sides_and_calls_each_as_asked():
    calls = []
    sides = {"ours": lambda: calls.append("o"), "peer": lambda: calls.append("p")}
    times = alternate(sides, "cpu", warmup=2, rounds=3, repeats=2)
    assert set(times) == {"ours", "peer"} and all(t >= 0 for t in times.values())
    assert calls == ["o", "o", "p", "p"] + ["o", "o", "p", "p"] * 3


def test_zero_initialised_weights_are_redrawn_and_nothing_else():
    block = SpatialTransformer(64, heads=2, dim_head=32, context_dim=16)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    assert redraw_zero_init_(block) == 1  # proj_out's weight (its bias is 1-d)
    after = block.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["proj_out.weight"] and after["proj_out.weight"].std() == pytest.approx(0.02, rel=0.2)


@pytest.mark.slow
def test_bench_cpu_appends_the_default_model_row(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "load_pipeline", lambda device: Pipeline(tiny_components()))  # fast stand-in
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        bench = __import__("bench")
    finally:
        sys.path.pop(0)
    out = tmp_path / "results.jsonl"
    assert bench.main(["--cpu", "--runs", "1", "--out", str(out)]) == 0
    (row,) = read_rows(out)
    assert row["benchmark"] == "txt2img_default_model_cpu_25steps" and row["unit"] == "s" and row["ours"] > 0
    assert row["peer"] is None and row["speedup"] is None
    assert row["command"] == f"python tools/bench.py --cpu --runs 1 --out {out}"
    assert row["details"]["steps"] == 25 and row["details"]["guidance"] == 5.0 and row["details"]["runs"] == 1


def test_the_peer_networks_hold_our_weights():
    parts = tiny_components()
    x, t, context = unet_inputs()
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    peer_unet, peer_vae = diffusers_unet(parts.unet).eval(), diffusers_vae(parts.autoencoder).eval()
    with torch.no_grad():
        assert_close_to_ref(peer_unet(x, t, encoder_hidden_states=context).sample, parts.unet(x, t, context=context),
                            rel=1e-5, what="diffusers' U-Net on our weights")
        assert_close_to_ref(peer_vae.encode(image).latent_dist.mean, parts.autoencoder.encode(image).mean,
                            rel=1e-5, what="diffusers' encoder on our weights")


def test_the_inference_networks_are_in_eval_mode_as_the_pipeline_runs_them():
    """Run 9's GroupNorm lever timed the reference path: the benchmark's U-Net was in training mode, which the
    fused norm then refused (it no longer looks at the mode). The inference benchmarks run what generation runs."""
    from ldm.bench.models import sd15_parts

    parts = sd15_parts("cpu", tiny=True)
    for name in ("unet", "autoencoder", "text_encoder"):
        assert not any(m.training for m in getattr(parts, name).modules()), name
    bench = benchmarks.Bench(torch.device("cpu"), "test", peer=False, backend="eager", tiny=True)
    assert bench.parts().unet.training is False
