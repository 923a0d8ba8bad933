"""Whether an SD-2.x single file without a YAML predicts eps (SD-2-base, 512 px) or v (SD-2 768-v): its shapes are the
same, so the answer comes, in this order, from

1. the file's own word, in its safetensors header: `modelspec.prediction_type` (Stability's model spec: `epsilon` or
   `v`), `modelspec.architecture` (`stable-diffusion-v2-512` or `stable-diffusion-v2-768-v`), kohya's
   `ss_v_parameterization`;
2. the training step a checkpoint records (`global_step`): diffusers' `from_single_file` rule, eps for 875000
   (SD-2.0-base's last step) and v for any other; diffusers reads a v2 file without one as v (SD-2.1-768's config);
3. the U-Net itself, when the file says neither (A1111's idea: one evaluation on a fixed input; `noise_slope`).

SD-2 inpainting files (9 input channels) are eps, as diffusers' and A1111's rules say; the x4 upscaler is v.
"""
from __future__ import annotations

from typing import Mapping

import torch

EPS, V = "epsilon", "v_prediction"
SD2_BASE_STEP = 875000  # diffusers' marker of SD-2.0-base (512-base-ema.ckpt): eps; any other step reads as v
EPS_SLOPE = 0.5  # noise_slope above this: eps (~1); below: v (~0)
PROBE_SIZE = 8  # latent pixels a side of the probe's input (at least the U-Net's downsampling)
PROBE_SEED = 0

_DECLARED = {"epsilon": EPS, "eps": EPS, "v": V, "v_prediction": V, "v-prediction": V}


def declared_prediction(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """(prediction type, the header entry that says it) from a safetensors header's training metadata, or None."""
    said = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if said in _DECLARED:
        return _DECLARED[said], f"the file's header: modelspec.prediction_type={said}"
    architecture = str(metadata.get("modelspec.architecture", "")).strip().lower()
    if architecture.startswith("stable-diffusion-v2"):
        kind = V if architecture.split("/")[0].endswith("-v") else EPS
        return kind, f"the file's header: modelspec.architecture={architecture}"
    kohya = str(metadata.get("ss_v_parameterization", "")).strip().lower()
    if kohya in ("true", "false"):
        return (V if kohya == "true" else EPS), f"the file's header: ss_v_parameterization={kohya}"
    return None


def step_prediction(global_step: int | None) -> tuple[str, str] | None:
    """diffusers' `from_single_file` rule for an SD-2 file that records its training step, or None without one."""
    if global_step is None:
        return None
    kind = EPS if global_step == SD2_BASE_STEP else V
    return kind, (f"the file's global_step {global_step}: diffusers' from_single_file rule, eps only for "
                  f"{SD2_BASE_STEP}, SD-2.0-base's last step")


@torch.no_grad()
def noise_slope(network, *, in_channels: int, context_dim: int | None, timestep: int, factor: int = 1) -> float:
    """The least-squares slope of `network`'s output on its input, for pure Gaussian noise at `timestep` (the last
    training one) and an empty (all-zero) text context.

    At the last timestep x_t = alpha x0 + sigma eps with alpha ~ 0.07 (SD's schedule), so the input is almost all
    noise: an eps network returns it (slope ~1), and a v network returns v = (alpha x_t - x0_hat) / sigma, whose
    x0_hat (the data's mean, pulled towards x_t by ~alpha) cancels the first term (slope ~0). One evaluation of
    `b c h w` = 1 x in_channels x 8 x 8.
    """
    weight = next(iter(getattr(network, "parameters", lambda: iter(()))()), None)
    device, dtype = (weight.device, weight.dtype) if weight is not None else (torch.device("cpu"), torch.float32)
    size = max(PROBE_SIZE, factor)
    x = torch.randn(1, in_channels, size, size, generator=torch.Generator().manual_seed(PROBE_SEED))
    cond = {} if context_dim is None else {"context": torch.zeros(1, 1, context_dim, device=device, dtype=dtype)}
    out = network(x.to(device, dtype), torch.full((1,), float(timestep), device=device), **cond)
    out = out.detach().to("cpu", torch.float64)[:, :in_channels]
    x = x.double()
    return float((out * x).sum() / (x * x).sum())


def probed_prediction(slope: float) -> tuple[str, str]:
    """(prediction type, why) from `noise_slope`'s measurement."""
    kind = EPS if slope > EPS_SLOPE else V
    return kind, (f"the U-Net itself: on pure noise at the last timestep its output has slope {slope:.2f} against "
                  "the input; an eps model returns the noise (~1), a v model does not (~0)")


def sd2_prediction(metadata: Mapping[str, str], global_step: int | None, probe) -> tuple[str, str]:
    """(prediction type, why) of a plain SD-2.x text-to-image file: the header, else the training step, else
    `probe()` (a zero-argument callable returning `noise_slope`'s measurement, run only when needed)."""
    return declared_prediction(metadata) or step_prediction(global_step) or probed_prediction(probe())
