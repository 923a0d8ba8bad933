"""Shared test helpers: the tolerance rule, realistic random weights, the base seed, tiny models and data."""
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn
from PIL import Image

from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.data.shards import AtomicShardWriter, encode_image, make_record
from ldm.data.synthetic import generate_shapes
from ldm.diffusion import SAMPLERS, BrownianNoise, DiscreteDenoiser, DiscreteSchedule, sampling_plan
from ldm.diffusion.schedules import ScheduleConfig
from ldm.io.components import ModelParts, SDComponents, config_sections, resolved_config
from ldm.io.part_types import build_part, read_section
from ldm.io.native_format import save_native
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder
from ldm.models.tokenizers import clip_tokenizer
from ldm.models.unet import UNetConfig, UNetModel
from ldm.train.config import TrainConfig

# Every test starts from torch.manual_seed(SEED) (conftest) and realistic_weights offsets its seeds by it, so
# `LDM_TEST_SEED=7 pytest ...` re-runs the suite on other random weights: a comparison must pass on every seed.
SEED = int(os.environ.get("LDM_TEST_SEED", "0"))


def subprocess_env(**extra: str) -> dict:
    """The environment for a child Python process that imports this checkout first, then whatever this process's
    PYTHONPATH reaches (dependencies carried on PYTHONPATH, as on the GPU machines, stay importable)."""
    root = str(Path(__file__).resolve().parents[1])
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(paths)}


def assert_close_to_ref(actual, reference, *, rel: float = 1e-5, floor: float = 1e-6, what: str = "") -> None:
    """max|actual - reference| <= rel * max|reference| + floor: the tolerance scales with the reference's magnitude."""
    actual, reference = _as_float64(actual), _as_float64(reference)
    assert actual.shape == reference.shape, f"{what} shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    error, scale = (actual - reference).abs().max().item(), reference.abs().max().item()
    tolerance = rel * scale + floor
    assert error <= tolerance, (f"{what} max|diff| {error:.3g} > {tolerance:.3g} "
                                f"= {rel:g} * max|ref| {scale:.3g} + {floor:g}")


def _as_float64(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).double()
    return torch.as_tensor(x).detach().double()


def realistic_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter at a trained network's scale: norm gains ~1, weights N(0, 1/fan_in), biases ~0.1.

    Unit-scale noise on every parameter (norm gains and embeddings included) drives a residual stream to
    |h| ~ 400, where two correct float32 implementations differ in the fifth digit. These draws keep activations
    O(1) while every parameter is non-zero and distinct (zero-initialised output layers and identity norms
    would hide a mis-mapped key).
    """
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + seed)
    gains = {id(m.weight) for m in module.modules()
             if "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator)
            if id(p) in gains:
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2:  # (out, in, ...): fan_in = in * kernel area
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return module


# --- tiny models -------------------------------------------------------------------------------------------------
# CLIP text encoder (transformers' CLIPTextConfig): width 32 gives one 64-wide head by SD-1's convention, so a
# checkpoint's shapes alone infer this config back.
CLIP_HF = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
# SD-2's OpenCLIP text tower, tiny.
OPENCLIP = {"embed_dim": 32, "text_cfg": dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=3,
                                              mlp_ratio=2.0), "quick_gelu": False}
# A whole open_clip model (image and text towers) for CLIP scores and CLIP features; random weights.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# The sections of a tiny native model folder (config.yaml) with a CLIP text encoder.
TINY_SD_SECTIONS = {
    "unet": dict(model_channels=32, attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2], num_heads=2,
                 context_dim=32),
    "autoencoder": dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32, scale_factor=0.5),
    # two heads in one layer: this random text encoder moves the image with the prompt (tests compare prompts)
    "text_encoder": dict(type="clip", hf_config={**CLIP_HF, "num_hidden_layers": 1, "num_attention_heads": 2}),
    "scheduler": dict(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False),
}


def tiny_configs(kind: str = "sd1", **unet_overrides):
    """(UNetConfig, AutoencoderConfig, TextEncoderConfig, ScheduleConfig) of a tiny SD-1 or SD-2 style model."""
    sd2 = kind == "sd2"
    unet = UNetConfig(**{**dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(2,), context_dim=32, transformer_depth=1,
                                num_heads=-1 if sd2 else 8, num_head_channels=32 if sd2 else -1,
                                use_linear_in_transformer=sd2), **unet_overrides})
    vae = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=32)
    text = (TextEncoderConfig(type="openclip", layer="penultimate", open_clip=OPENCLIP) if sd2
            else TextEncoderConfig(type="clip", layer="last", hf_config=CLIP_HF))
    schedule = ScheduleConfig(prediction_type="v_prediction" if sd2 else "epsilon", steps_offset=1,
                              set_alpha_to_one=False)
    return unet, vae, text, schedule


def tiny_components(kind: str = "sd1", seed: int = 0, **unet_overrides) -> SDComponents:
    """Tiny SD-1 or SD-2 style components at realistic weight scale, every weight non-zero, in eval mode."""
    unet_cfg, vae_cfg, text_cfg, schedule = tiny_configs(kind, **unet_overrides)
    unet = realistic_weights(UNetModel(unet_cfg), seed)
    vae = realistic_weights(AutoencoderKL(vae_cfg), seed + 1)
    text = realistic_weights(build_text_encoder(text_cfg), seed + 2)
    for m in (unet, vae, text):
        m.eval()
    return SDComponents(unet, vae, text, schedule, resolved_config(unet_cfg, vae_cfg, text_cfg, schedule), "tiny")


def unet_inputs(in_channels: int = 4, seed: int = 1):
    """(x b c h w, timesteps b, context b n d) for a tiny U-Net."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, in_channels, 16, 16, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 7, 32, generator=g))


def write_tiny_sd(folder, *, seed: int = 0, in_channels: int = 4, **sections) -> Path:
    """A tiny native model folder (TINY_SD_SECTIONS, each section updated by `sections`); returns the folder."""
    sections = {k: {**v, **sections.get(k, {})} for k, v in TINY_SD_SECTIONS.items()}
    sections["unet"]["in_channels"] = in_channels
    torch.manual_seed(SEED + seed)
    unet = UNetModel(from_dict(UNetConfig, sections["unet"]))
    with torch.no_grad():  # zero-initialised layers (output conv, transformer proj_out) would hide the prompt
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)
    components = SDComponents(
        unet=unet,
        autoencoder=AutoencoderKL(from_dict(AutoencoderConfig, sections["autoencoder"])),
        text_encoder=build_text_encoder(from_dict(TextEncoderConfig, sections["text_encoder"])),
        schedule=from_dict(ScheduleConfig, sections["scheduler"]),
        config=sections, source="test",
    )
    save_native(components, folder)
    return Path(folder)


# --- training ----------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
FAST_TRAINING = ["progress=false", "log_with=none", "sampling.at_end=false", "data.batches_per_epoch=2",
                 "data.caption_dropout=0.5", "checkpoint_every=2", "checkpoints_total_limit=null", "ema.decay=0.5"]


def tiny_train_config(shards: str, out: Path, *overrides: str) -> TrainConfig:
    """configs/tiny.yaml on `shards`, writing to `out`, made fast (FAST_TRAINING), then `overrides`."""
    data = apply_overrides(load_yaml(ROOT / "configs" / "tiny.yaml"), [*FAST_TRAINING, *overrides])
    data["data"]["shards"] = shards
    data["output_dir"] = str(out)
    return from_dict(TrainConfig, data)


def tiny_resumable_config(shards: str, out: Path, *overrides: str) -> TrainConfig:
    """tiny_train_config with a checkpoint after every step (what the kill-and-resume tests need)."""
    return tiny_train_config(shards, out, "checkpoint_every=1", *overrides)


# ModelConfig sections of a tiny trainable SD model (ldm.train.model.build_parts); add "random_autoencoder": True
# unless pretrained autoencoder weights are given.
TINY_TRAIN_MODEL = dict(
    unet=dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_heads=-1,
              num_head_channels=16, context_dim=32),
    autoencoder=dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, resolution=32, norm_groups=8, scale_factor=0.5),
    text_encoder=dict(type="clip", hf_config=CLIP_HF),
)


def write_bad_shard(folder: Path, good: int = 5) -> Path:
    """One shard: a truncated JPEG, garbage bytes named .jpg, `good` valid samples, then an image without caption."""
    jpeg = encode_image(Image.new("RGB", (48, 48), (200, 10, 10)), "jpg")
    records = [
        make_record("bad_truncated", jpeg[: len(jpeg) // 2], "jpg", "a truncated red square", {}),
        make_record("bad_garbage", b"this is not a jpeg at all" * 10, "jpg", "garbage bytes", {}),
    ]
    for s in generate_shapes(good, seed=2, image_size=32):
        records.append(make_record(s.key, encode_image(s.image, "jpg"), "jpg", s.caption, {}))
    records.append({"__key__": "bad_nocaption", "jpg": jpeg})
    with AtomicShardWriter(folder) as writer:
        for r in records:
            writer.write(r)
    return folder


# --- command lines -----------------------------------------------------------------------------------------------
def run_cli(main, argv, capsys):
    """(exit code, stderr) of a CLI's `main`; argparse's own errors exit 2 through SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# --- image folders -----------------------------------------------------------------------------------------------
def noisy_image(seed: int, size: int = 32) -> Image.Image:
    """A square RGB image: one random colour plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    arr = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def captioned_folder(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """An imagefolder (PNGs + metadata.jsonl) with one noisy image per caption; names contain a space."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(texts):
        name = f"img {i}.png"  # a space: index.html must URL-quote the path
        noisy_image(seed + i).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_images(folder: Path, seed: int, sizes=((32, 32), (32, 32), (40, 24))) -> Path:
    """Random-pixel PNGs of the given (width, height) sizes, named 000.png, 001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


# --- Gaussian data: samplers with known answers ------------------------------------------------------------------
# Data ~ N(MU, S^2): the exact denoiser and the probability-flow ODE's solution are known in closed form.
MU, S = 0.5, 0.7


def gaussian_denoiser(x, sigma, cond=None):
    """D(x, sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    sigma = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_ode(x_t, sigma_t, sigma_end, drift=1.0):
    """The probability-flow ODE solution: x(sigma) = mu + (x_T - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)).

    With `drift` c = 1 + eta the solution of dx/dlambda = -c (x - D): the mean path of the reverse SDE that an SDE
    solver with that eta follows (c = 2 is the reverse-time SDE of Song et al. 2021), i.e. its noise-free run.
    """
    return MU + (x_t - MU) * ((S**2 + sigma_end**2) / (S**2 + sigma_t**2)) ** (drift / 2)


def convergence_slope(sampler, steps=(8, 16, 32, 64), drift=1.0):
    """(slope of log error against log steps, errors) of `sampler` against exact_ode from sigma 10 to 0.05."""
    sigma_t, sigma_end = 10.0, 0.05
    x_t = torch.linspace(-20, 20, 9, dtype=torch.float64).view(9, 1)
    errors = []
    for n in steps:
        sigmas = torch.exp(torch.linspace(math.log(sigma_t), math.log(sigma_end), n + 1, dtype=torch.float64))
        out = sampler(gaussian_denoiser, x_t.clone(), sigmas)
        errors.append((out - exact_ode(x_t, sigma_t, sigma_end, drift)).abs().max().item())
    return np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


# --- diffusers' schedulers: the same loop on an analytic network --------------------------------------------------
# Stable Diffusion 1.5's scheduler_config.json (a PNDMScheduler config: no timestep_spacing, steps_offset 1).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# Our sampler name -> (diffusers scheduler class, its from_config keyword arguments).
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),  # bh2, order 2 by default
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),  # its Brownian tree replaced by ours (run_diffusers)
    # Order 3 with the "heun" second-order step (k-diffusion's); diffusers' third-order SDE step differs from ours
    # (docs/samplers.md), so only the first two orders are compared (3 steps).
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                     "solver_type": "heun"}),
}
# Samplers whose diffusers loop matches ours only on short runs (above): not in the many-step comparisons.
DIFFUSERS_SHORT_RUNS_ONLY = {"dpmpp_3m_sde"}
# (timestep atol, rel) for comparing a sampler's loop with diffusers': the network sees diffusers' timesteps, at the
# midpoints (dpm_2, dpm_2_ancestral, dpmpp_sde) too, to float32 rounding (~6e-5 of a timestep; ours compute a midpoint
# sigma in float64). The midpoint samplers needed (1e-2, 1e-4) while ours fed the linear inverse of sigma(t) there.
DIFFUSERS_TOLERANCE = (2e-4, 1e-5)
# The samplers the whole-pipeline parity tests run (one of each kind, to keep them quick).
PIPELINE_SAMPLERS = ("ddim", "euler", "dpmpp_2m", "unipc", "lms")
SHAPE = (2, 3, 4, 4)  # the sample shape of the scheduler-loop parity tests


def diffusers_scheduler(sampler: str, config):
    """diffusers' scheduler that matches our `sampler`, built from a scheduler config."""
    import diffusers

    name, kwargs = DIFFUSERS_SCHEDULERS[sampler]
    if name == "DPMSolverSDEScheduler":
        return _dpm_solver_sde_class().from_config(config, **kwargs)
    return getattr(diffusers, name).from_config(config, **kwargs)


def _dpm_solver_sde_class():
    """diffusers' DPMSolverSDEScheduler, also without torchsde (whose Brownian tree run_diffusers replaces)."""
    stub = importlib.util.find_spec("torchsde") is None
    if stub:
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        return importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde").DPMSolverSDEScheduler
    finally:
        if stub:
            del sys.modules["torchsde"]


class GaussianNet:
    """The exact eps / v network for N(0.3, 0.8^2) data, computing sigma from t with its own copy of the schedule."""

    MU, STD = 0.3, 0.8  # the data: every element ~ N(MU, STD^2) independently

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str, learned_variance: bool = False):
        a = alphas_cumprod.double().numpy()
        self.learned_variance = learned_variance
        self.sigmas = np.sqrt((1 - a) / a)
        self.prediction = prediction
        self.timesteps_seen = []

    def __call__(self, x_in: torch.Tensor, t, **cond) -> torch.Tensor:
        mu, std = self.MU, self.STD
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_in.shape[0])
        self.timesteps_seen.append(float(t[0]))
        sigma = torch.from_numpy(np.interp(t.numpy(), np.arange(len(self.sigmas)), self.sigmas)).view(-1, 1, 1, 1)
        alpha = 1 / (1 + sigma**2).sqrt()
        x = x_in.double() / alpha  # VP input -> VE coordinates
        x0 = mu + std**2 / (std**2 + sigma**2) * (x - mu)  # the exact denoiser D(x, sigma)
        eps = (x - x0) / sigma
        out = eps if self.prediction == "epsilon" else alpha * eps - alpha * sigma * x0  # v = a eps - s_vp x0
        if self.learned_variance:  # a made-up variance output in [-1, 1] that depends on x and t
            out = torch.cat([out, torch.tanh(x_in.double() * 3 + t.view(-1, 1, 1, 1) / 500 - 1)], dim=1)
        return out.float()


def run_diffusers(name: str, config: dict, steps: int, shape, seed: int = 0, eta: float = 0.0,
                  options: dict | None = None):
    """(final sample, timesteps the network saw) of diffusers' scheduler loop for sampler `name` on GaussianNet.

    `options` go to every `scheduler.step` (Euler's s_churn, ...). A Brownian-tree scheduler (DPMSolverSDE) gets our
    `BrownianNoise` on the loop's generator in place of torchsde's tree: the same path our sampler draws.
    """
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):  # as IFPipeline does: a repeated first timestep (cosine schedule with
        scheduler.set_begin_index(0)           # Karras sigmas) would start its step count at the repeat otherwise
    learned = config.get("variance_type") == "learned_range"
    net = GaussianNet(scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"), learned)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    accepted = inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if "generator" in accepted else {}
    if name == "ddim":
        extra["eta"] = eta
    extra.update(options or {})
    if hasattr(scheduler, "noise_sampler"):
        scheduler.noise_sampler = BrownianNoise(x, generator)
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x, **extra).prev_sample
    return x, net.timesteps_seen


def run_ours(name: str, config: dict, steps: int, shape, seed: int = 0, eta: float = 0.0,
             options: dict | None = None, sigmas: str = "model"):
    """(final sample, timesteps the network saw) of our sampling plan (sigma schedule `sigmas`) and sampler `name`
    on GaussianNet."""
    schedule_config = ScheduleConfig.from_diffusers(config)
    schedule = DiscreteSchedule.from_config(schedule_config)
    alphas_cumprod = torch.cumprod(1 - schedule_config.betas(), 0)
    alphas_cumprod[alphas_cumprod <= 0] = 2**-24  # zero terminal SNR: the stand-in diffusers' Euler/DPM use
    net = GaussianNet(alphas_cumprod, schedule_config.prediction_type, config.get("variance_type") == "learned_range")
    denoiser = DiscreteDenoiser(net, schedule, schedule_config.prediction_type)
    plan = sampling_plan(schedule_config, name, steps, sigmas)
    denoiser = plan.with_network_timesteps(denoiser)  # as `ldm.pipeline.sampling.sample` does
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * plan.init_noise_scale
    extra = {"eta": eta} if name == "ddim" else {}
    if name == "dpmpp_2m_sde" and "solver_type" in config:
        extra["solver_type"] = config["solver_type"]
    extra.update(options or {})
    x = SAMPLERS[name](denoiser, x, plan.sigmas, None, generator=generator, **extra, **plan.sampler_kwargs)
    return x * plan.final_scale, net.timesteps_seen


# --- diffusers' pipelines: a tiny SD model in diffusers' own classes ----------------------------------------------
def tiny_diffusers_parts(in_channels: int = 4):
    """(unet, vae, text_encoder, tokenizer) of a tiny SD-1 model in diffusers / transformers classes, in eval mode."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)  # diffusers' and transformers' own initialisation: weights at a realistic scale
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )).eval()
    return unet.eval(), vae.eval(), text_encoder, clip_tokenizer()


def diffusers_sd_folder(tmp_path_factory, pipeline_class, in_channels: int = 4):
    """(folder, pipe): a tiny `pipeline_class` (PNDM, SD-1.5's scheduler config) saved as a diffusers folder."""
    import diffusers

    unet, vae, text_encoder, tokenizer = tiny_diffusers_parts(in_channels)
    pipe = pipeline_class(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                          feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("tiny-sd") / "pipe"
    pipe.save_pretrained(folder)
    # like SD-1.5's official folder: no timestep_spacing, so each sampler's default spacing applies
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.pop("timestep_spacing", None)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder, pipe


def assert_same_image(image: Image.Image, expected: np.ndarray, what: str) -> None:
    """Our 8-bit image is diffusers' float image within 1/255 mean absolute difference, and not constant."""
    got = np.asarray(image, dtype=np.float64) / 255.0
    expected = (expected * 255).round() / 255.0
    mad = np.abs(got - expected).mean()
    assert mad <= 1 / 255, f"{what}: mean |diff| {mad * 255:.3f}/255"
    assert got.std() > 0.01  # not trivially constant (the comparison would pass vacuously otherwise)


def patch_everywhere(monkeypatch, dotted: str, replacement) -> None:
    """Replace `module.attr` and every `ldm` module's own binding of the same object (`from module import attr`)."""
    module_name, attr = dotted.rsplit(".", 1)
    original = getattr(importlib.import_module(module_name), attr)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("ldm") and getattr(module, attr, None) is original:
            monkeypatch.setattr(module, attr, replacement)


def visible_weights(module: nn.Module) -> nn.Module:
    """Small random weights in the zero-initialised layers, so that the prompt and the low-res image matter."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)
    return module


def stage_parts(name: str, text_encoder: nn.Module | None = None, **stage) -> ModelParts:
    """A random tiny stage of configs/imagen-tiny-NAME.yaml (sharing `text_encoder` when given)."""
    raw = load_yaml(Path(__file__).resolve().parents[1] / "configs" / f"imagen-tiny-{name}.yaml")["model"]
    configs = {role: read_section(role, raw[role]) for role in ("unet", "text_encoder")}
    text_encoder = text_encoder if text_encoder is not None else build_part(configs["text_encoder"])
    schedule = from_dict(ScheduleConfig, raw["schedule"])
    config = {**config_sections(configs, schedule), "stage": {**raw["stage"], **stage}}
    return ModelParts(unet=visible_weights(build_part(configs["unet"])), text_encoder=text_encoder, schedule=schedule,
                      config=config)


def open_clip_text(model_cfg: dict, state_dict: dict) -> torch.nn.Module:
    """open_clip's own CLIP (visual tower removed) of an open_clip model config, holding `state_dict`: the reference
    for ldm's OpenCLIPTextTower."""
    from open_clip.model import CLIP, CLIPVisionCfg

    clip = CLIP(model_cfg["embed_dim"], CLIPVisionCfg(layers=1, width=8, head_width=8, patch_size=8, image_size=8),
                model_cfg["text_cfg"], quick_gelu=model_cfg.get("quick_gelu", False))
    del clip.visual
    clip.load_state_dict(state_dict)
    return clip.eval()
