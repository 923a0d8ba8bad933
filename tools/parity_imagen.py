"""Parity of ldm's Imagen pieces with imagen-pytorch (lucidrains) and DeepFloyd IF (diffusers) on the same inputs.

Prints one JSON line per comparison: `max_rel` = max|ours - peer| / max|peer|. imagen-pytorch is never a dependency
of ldm: install it apart and point --imagen-pytorch at that folder (the tool imports it without its T5 module, which
would reach the model hub at import):

    python -m pip install --target /tmp/ip --no-deps imagen-pytorch ema-pytorch beartype einops-exts kornia kornia-rs
    python tools/parity_imagen.py --imagen-pytorch /tmp/ip

Comparisons (docs/imagen.md, "Parity with imagen-pytorch and DeepFloyd IF"):
- threshold/*: dynamic thresholding of x0, ours against imagen-pytorch's `p_mean_variance` and diffusers'
  `DDPMScheduler._threshold_sample`; with thresholding off imagen-pytorch clips x0 to [-1, 1].
- lowres_aug/*: the noised low-res image and the level the network is told, against imagen-pytorch's
  `lowres_noise_schedule` and IFSuperResolutionPipeline's resize + `add_noise(noise_level)`.
- schedule/*: imagen-pytorch's continuous cosine log-SNR against ldm's `cosine` schedule (squaredcos_cap_v2).
- guided_step/*: classifier-free guidance, then thresholding of x0, then the DDPM posterior, over a tiny
  imagen-pytorch U-Net: ldm's `dynamic_threshold(cfg(...))` and ancestral sampler against imagen-pytorch's loop.
- if_ddpm/*: one run of IF's DDPMScheduler (learned-range variance) with thresholding on and off, against ldm's
  `ddpm` sampler and the stage's thresholding wrappers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.diffusion.denoiser import Denoiser  # noqa: E402
from ldm.diffusion.guidance import cfg, dynamic_threshold  # noqa: E402
from ldm.diffusion.noise_augmentation import (  # noqa: E402
    augment, conditioning_image, if_noise_level_from_level, level_from_if_noise_level, level_from_imagen_pytorch,
    upsample)
from ldm.diffusion.samplers import sample_ddpm, sample_euler_ancestral  # noqa: E402
from ldm.diffusion.scalings import EpsScaling  # noqa: E402
from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig  # noqa: E402


def max_rel(ours: torch.Tensor, peer: torch.Tensor) -> float:
    ours, peer = ours.double(), peer.double()
    return float((ours - peer).abs().max() / peer.abs().max().clamp_min(1e-300))


def report(name: str, ours, peer, **extra) -> None:
    print(json.dumps({"comparison": name, "max_rel": float(f"{max_rel(ours, peer):.3g}"), **extra}), flush=True)


def import_imagen_pytorch(folder: str):
    """imagen_pytorch.imagen_pytorch from a pip --target folder, with a stand-in for its T5 module."""
    root = Path(folder)
    sys.path.insert(0, str(root))
    package = types.ModuleType("imagen_pytorch")
    package.__path__ = [str(root / "imagen_pytorch")]
    t5 = types.ModuleType("imagen_pytorch.t5")
    t5.DEFAULT_T5_NAME = "none"
    t5.get_encoded_dim = lambda name: 32
    t5.t5_encode_text = t5.t5_tokenize = t5.t5_encode_tokenized_text = print  # never called: text comes as embeddings
    sys.modules.update({"imagen_pytorch": package, "imagen_pytorch.t5": t5})
    import imagen_pytorch.imagen_pytorch as ip

    return ip


def scaled_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter non-zero at a trained network's scale (imagen-pytorch zero-initialises some outputs)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "gamma" in name or "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


# --- dynamic thresholding -------------------------------------------------------------------------------------------
def compare_thresholding(ip, imagen, generator) -> None:
    sched = imagen.noise_schedulers[0]
    x = torch.randn(4, 3, 16, 16, generator=generator)
    eps = 1.5 * torch.randn(4, 3, 16, 16, generator=generator)
    t = torch.tensor([0.2, 0.5, 0.8, 0.95])
    raw = sched.predict_start_from_noise(x, t=t, noise=eps)
    _, peer = imagen.p_mean_variance(None, x, t, noise_scheduler=sched, model_output=eps, dynamic_threshold=True)
    ours = dynamic_threshold(lambda x_, s_, c_: raw, imagen.dynamic_thresholding_percentile)(x, t)
    report("threshold/imagen_pytorch_p0.95", ours, peer, fraction_above_1=float((raw.abs() > 1).float().mean()))
    _, peer_off = imagen.p_mean_variance(None, x, t, noise_scheduler=sched, model_output=eps,
                                         dynamic_threshold=False)
    report("threshold/imagen_pytorch_off_clips_to_1", raw, peer_off, note="ours off = no clipping (documented)")
    report("threshold/imagen_pytorch_off_vs_static", dynamic_threshold(lambda x_, s_, c_: raw, 1.0, 1.0)(x, t),
           peer_off, note="ldm's static clipping (max_value 1)")

    import diffusers

    for cap in (1.0, 1.5):
        scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=cap)
        peer = scheduler._threshold_sample(raw.clone())
        ours = dynamic_threshold(lambda x_, s_, c_: raw, 0.95, cap)(x, t)
        report(f"threshold/diffusers_p0.95_cap{cap}", ours, peer)


# --- noise-conditioning augmentation --------------------------------------------------------------------------------
def compare_augmentation(imagen, generator) -> None:
    low = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    big = upsample(low, 32)
    noise = torch.randn(big.shape, generator=generator)
    lowres = imagen.lowres_noise_schedule
    worst = worst_cond = 0.0
    for t in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
        peer, log_snr, _, _ = lowres.q_sample(x_start=big, t=torch.full((2,), t), noise=noise)
        level = level_from_imagen_pytorch(t)
        worst = max(worst, max_rel(augment(big, level, noise), peer))
        # the network's condition: imagen-pytorch embeds log_snr(t); ldm the level (EfficientUNet: 1000 * level)
        ours_log_snr = 2 * torch.log(1 / torch.tan(level * math.pi / 2))
        worst_cond = max(worst_cond, max_rel(ours_log_snr, lowres.get_condition(torch.tensor(t)).double()))
    print(json.dumps({"comparison": "lowres_aug/imagen_pytorch_q_sample_t0..0.8", "max_rel": float(f"{worst:.3g}")}))
    print(json.dumps({"comparison": "lowres_aug/imagen_pytorch_log_snr_of_level", "max_rel":
                      float(f"{worst_cond:.3g}"), "note": "same noise level; it reaches the networks as log_snr "
                      "(imagen-pytorch) and as 1000 * level (EfficientUNet)"}))
    nearest = F.interpolate(low, 32, mode="nearest")
    report("lowres_aug/imagen_pytorch_resize_nearest_vs_bicubic", big, nearest, note="documented: ldm resizes bicubic")

    import diffusers

    noising = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    worst = 0.0
    exact_labels = True
    for n in (0, 20, 100, 250, 500, 999):
        # IFSuperResolutionPipeline: bilinear, align_corners upscaling, then add_noise at `noise_level` as a timestep
        upscaled = F.interpolate(low, (32, 32), mode="bilinear", align_corners=True)
        peer = noising.add_noise(upscaled, noise, torch.tensor([n, n]))
        level = level_from_if_noise_level(n)
        ours = conditioning_image(low, 32, float(level), noise, mode="bilinear_align_corners")
        worst = max(worst, max_rel(ours, peer))
        exact_labels &= float(if_noise_level_from_level(level.float())) == n
    print(json.dumps({"comparison": "lowres_aug/if_add_noise_levels_0..999", "max_rel": float(f"{worst:.3g}"),
                      "class_label_exact": exact_labels}))


# --- the continuous cosine schedule ---------------------------------------------------------------------------------
def compare_schedule(ip) -> None:
    n = 1000
    ours = DiscreteSchedule.from_config(ScheduleConfig(beta_schedule="cosine"))
    t = torch.arange(1, n + 1, dtype=torch.float64) / n  # our timestep i sits at t = (i + 1) / n of the continuum
    peer_log_snr = ip.alpha_cosine_log_snr(t)
    ours_log_snr = -2 * torch.log(ours.sigmas.double())
    body = slice(0, n - 20)
    gap = (ours_log_snr - peer_log_snr)[body].abs()
    report("schedule/cosine_log_snr_t<=0.98", ours_log_snr[body], peer_log_snr[body],
           max_abs=round(float(gap.max()), 3), at_t=float(t[gap.argmax()]),
           sigma_at_t0001={"ours": round(float(ours.sigmas[0]), 5),
                           "peer": round(float(torch.exp(-peer_log_snr[0] / 2)), 5)})
    peer_alpha2, ours_alpha2 = torch.sigmoid(peer_log_snr), ours.alphas_cumprod.double()
    report("schedule/cosine_alpha_bar_all_t", ours_alpha2, peer_alpha2,
           ours_sigma_max=round(ours.sigma_max, 1), peer_sigma_at_t1=float(torch.exp(-peer_log_snr[-1] / 2)))


# --- CFG, then thresholding, then the posterior -------------------------------------------------------------------
class PeerNetwork(torch.nn.Module):
    """imagen-pytorch's Unet behind ldm's network contract: (x_in, c_noise = VE sigma, text, drop) -> eps."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, sigma, text_embeds, drop):
        log_snr = -2 * torch.log(sigma.float())
        out = torch.empty_like(x)
        for flag in (0.0, 1.0):  # the conditional and the unconditional rows (cond_drop_prob 0 / 1)
            rows = drop == flag
            if rows.any():
                out[rows] = self.unet(x[rows], log_snr[rows], text_embeds=text_embeds[rows], cond_drop_prob=flag)
        return out


def compare_guided_steps(ip, imagen, generator, steps: int, scale: float) -> None:
    sched = imagen.noise_schedulers[0]
    unet = imagen.unets[0]
    text = torch.randn(2, 6, 32, generator=generator)
    x_vp = torch.randn(2, 3, 16, 16, generator=generator)
    times = torch.linspace(0.9, 0.0, steps + 1)  # t = 1 has log_snr -75 (sigma ~ 1e16): start below it
    denoiser = Denoiser(PeerNetwork(unet), EpsScaling())
    cond = {"cond": {"text_embeds": text, "drop": torch.zeros(2)}, "uncond": {"text_embeds": text,
                                                                             "drop": torch.ones(2)}}

    def sigma(t):
        return float(torch.exp(-ip.alpha_cosine_log_snr(torch.tensor(t, dtype=torch.float64)) / 2))

    sigmas = [sigma(float(t)) for t in times]

    def peer_loop(remove_parallel):
        img = x_vp.clone()
        for t, t_next in zip(times[:-1], times[1:]):
            (mean, _, _), _ = imagen.p_mean_variance(
                unet, img, t.repeat(2), t_next=t_next.repeat(2), noise_scheduler=sched, text_embeds=text,
                cond_scale=scale, cfg_remove_parallel_component=remove_parallel, dynamic_threshold=True)
            img = mean  # the posterior mean: both sides skip the fresh noise, so they can be compared
        return img

    guided = dynamic_threshold(cfg(denoiser, scale), imagen.dynamic_thresholding_percentile)
    ours_ve = sample_euler_ancestral(guided, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, cond, s_noise=0.0)
    ours = ours_ve / math.sqrt(1 + sigmas[-1] ** 2)
    with torch.no_grad():
        report(f"guided_step/imagen_pytorch_{steps}_steps_cfg{scale}_paper", ours, peer_loop(False),
               note="imagen-pytorch with cfg_remove_parallel_component=False (the paper's guidance)")
        report(f"guided_step/imagen_pytorch_{steps}_steps_cfg{scale}_default", ours, peer_loop(True),
               note="imagen-pytorch's default removes the guidance update's part parallel to the conditional eps")
        wrong = cfg(dynamic_threshold(denoiser, imagen.dynamic_thresholding_percentile), scale)
        wrong_ve = sample_euler_ancestral(wrong, x_vp * math.sqrt(1 + sigmas[0] ** 2), sigmas, cond, s_noise=0.0)
        report("guided_step/threshold_before_cfg_for_scale", wrong_ve / math.sqrt(1 + sigmas[-1] ** 2),
               peer_loop(False), note="the wrong order, to show the comparison can fail")


# --- DeepFloyd IF's DDPM step: learned-range variance, thresholding on / off ---------------------------------------
def compare_if_ddpm(generator, steps: int) -> None:
    import diffusers

    from ldm.diffusion.noise_augmentation import StageConfig
    from ldm.diffusion.plans import sampling_plan
    from ldm.models.codecs import IdentityCodec
    from ldm.pipeline.stage import Stage

    if_config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                     prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0,
                     dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
    eps = 1.5 * torch.randn(1, 3, 8, 8, generator=generator)
    v = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    start = torch.randn(1, 3, 8, 8, generator=generator)

    class Network(torch.nn.Module):  # an eps that depends on x, and a fixed variance output
        def forward(self, x_in, timestep, **_):
            return torch.cat([eps + 0.3 * x_in, v], dim=1)

    network = Network()

    for thresholding in (True, False):
        config = {**if_config, "thresholding": thresholding}
        scheduler = diffusers.DDPMScheduler(**config)
        scheduler.set_timesteps(steps)
        noise_gen = torch.Generator().manual_seed(1)
        x = start.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(network(x, t), t, x, generator=noise_gen).prev_sample
        schedule = ScheduleConfig.from_diffusers(config)
        plan = sampling_plan(schedule, "ddpm", steps)
        stage = Stage(Network(), schedule, IdentityCodec(), stage_config=StageConfig(
            resolution=8, dynamic_threshold=0.95 if thresholding else None, dynamic_threshold_max=1.5))
        denoiser = stage.denoiser
        for wrap in stage.thresholding():  # what `ldm.pipeline.sampling.sample` applies: dynamic, or clip_sample
            denoiser = wrap(denoiser)
        sigmas = plan.sigmas.tolist()
        ours = sample_ddpm(denoiser, start * math.sqrt(1 + sigmas[0] ** 2), sigmas, None,
                           generator=torch.Generator().manual_seed(1))
        ours = ours / math.sqrt(1 + sigmas[-1] ** 2)
        report(f"if_ddpm/{steps}_steps_thresholding_{'on' if thresholding else 'off_clip_sample'}", ours, x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imagen-pytorch", required=True, help="folder holding the imagen_pytorch package (pip --target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    ip = import_imagen_pytorch(args.imagen_pytorch)
    unet = ip.Unet(dim=16, dim_mults=(1, 2), text_embed_dim=32, num_resnet_blocks=1, layer_attns=False,
                   layer_cross_attns=(False, True), attn_heads=2, attn_dim_head=8, attend_at_middle=False,
                   max_text_len=6)
    imagen = ip.Imagen(unets=(unet,), image_sizes=(16,), text_embed_dim=32, timesteps=args.steps).eval()
    scaled_weights(imagen.unets[0], generator)
    with torch.no_grad():
        compare_thresholding(ip, imagen, generator)
        compare_augmentation(imagen, generator)
        compare_schedule(ip)
        compare_guided_steps(ip, imagen, generator, args.steps, args.guidance)
        compare_if_ddpm(generator, args.steps)


if __name__ == "__main__":
    main()
