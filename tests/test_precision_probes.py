"""The precision probes of the benchmark record run end to end on toy networks and report what they promise:
GroupNorm's two half-precision paths (`tools/probe_group_norm.py`) and FP8 beside bf16 (`tools/probe_fp8_error.py`),
each as a distance from the float32 network that bf16 rounding bounds."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _probe(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_group_norm_probe_compares_both_paths_with_float32():
    out = _probe("probe_group_norm.py", "--tiny", "--cpu", "--latent", "8")
    assert out["group_norms"] > 0 and set(out["eager_ms"]) == {"kernel", "casts"}
    for key in ("kernel_vs_fp32", "casts_vs_fp32"):
        assert 0 < out[key] < 0.05  # bf16's whole-network error: above zero, a few per cent at most
    assert 0 <= out["output_change"] < 0.05


def test_the_fp8_probe_reports_fp8_and_bf16_against_float32_per_timestep():
    out = _probe("probe_fp8_error.py", "--tiny", "--cpu", "--latent", "8", "--timesteps", "501")
    assert out["fp8_linears"] > 0
    (row,) = out["by_timestep"].values()
    assert 0 < row["bf16_vs_fp32"] < 0.05
    assert 0 < row["fp8_vs_fp32"] < 0.1 and 0 < row["fp8_vs_bf16"] < 0.1


def test_relative_l2_has_its_known_answers():
    import torch

    from ldm.bench.models import relative_l2

    reference = torch.tensor([3.0, 4.0])  # norm 5
    assert relative_l2(torch.tensor([3.0, 4.0]), reference) == 0.0
    assert abs(relative_l2(torch.tensor([3.0, 5.0]), reference) - 0.2) < 1e-7
    assert abs(relative_l2(torch.tensor([3.0, 4.0], dtype=torch.bfloat16) * 1.5, reference) - 0.5) < 1e-7
