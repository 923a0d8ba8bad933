"""The networks both sides run: Stable Diffusion 1.5 at full size with random weights, ours and diffusers' built
from the same state dicts (diffusers is imported only here, and only when a peer is asked for)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ldm.diffusion.schedules import ScheduleConfig
from ldm.io.components import ModelParts, SDComponents, resolved_config
from ldm.io.diffusers_format import save_diffusers
from ldm.io.keys_unet import unet_config_to_diffusers, unet_original_to_diffusers
from ldm.io.keys_vae import vae_config_to_diffusers, vae_original_to_diffusers
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder
from ldm.models.unet import UNetConfig, UNetModel

SD15_UNET = UNetConfig()  # the dataclass defaults are SD-1.x: 320 channels, (1, 2, 4, 4), 768-d CLIP context
SD15_VAE = AutoencoderConfig()
SD15_TEXT = TextEncoderConfig(type="clip")  # CLIP ViT-L/14's text tower, random init
SD15_SCHEDULE = ScheduleConfig()  # scaled_linear 0.00085 .. 0.012, epsilon
# `tools/bench.py --dry-run`: the same layout at toy width (8x downsampling, 77 CLIP tokens), for the CPU
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                       num_heads=2, context_dim=32)
TINY_VAE = AutoencoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, resolution=64)
TINY_TEXT = TextEncoderConfig(type="clip", hf_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          max_position_embeddings=77, hidden_act="quick_gelu",
                                                          projection_dim=32))


def redraw_zero_init_(module: nn.Module, std: float = 0.02, seed: int = 0) -> int:
    """Give the zero-initialised weights (residual outputs) small random values; returns how many were redrawn.

    A trained network has no all-zero layers, and a matrix product of zeros runs faster (less power) than of
    real data, so timing a fresh init would flatter both sides.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    count = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
                count += 1
    return count


def sd15_unet(device: torch.device | str, dtype: torch.dtype = torch.float32, seed: int = 0, *,
              tiny: bool = False) -> UNetModel:
    """Our SD-1.5 U-Net (`tiny`: toy width) with random (nowhere zero) weights, built directly on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetModel(TINY_UNET if tiny else SD15_UNET)
    redraw_zero_init_(unet, seed=seed)
    return unet.to(dtype)


def sd15_parts(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, *,
               tiny: bool = False) -> ModelParts:
    """The whole SD-1.5 model (U-Net, KL autoencoder, CLIP text encoder, schedule) with random weights."""
    unet = sd15_unet(device, dtype, seed, tiny=tiny)
    vae_config, text_config = (TINY_VAE, TINY_TEXT) if tiny else (SD15_VAE, SD15_TEXT)
    with torch.device(device):
        autoencoder = AutoencoderKL(vae_config)
        text_encoder = build_text_encoder(text_config)
    redraw_zero_init_(autoencoder, seed=seed + 1)
    # eval mode, as the pipeline runs them (Stage): the inference benchmarks time what generation runs (the
    # training benchmark builds its own U-Net in training mode)
    return SDComponents(unet=unet.eval(), autoencoder=autoencoder.to(dtype).eval(),
                        text_encoder=text_encoder.to(dtype).eval(),
                        schedule=SD15_SCHEDULE, source="random SD-1.5 (ldm.bench.models)" + (", tiny" if tiny else ""),
                        config=resolved_config(unet.config, vae_config, text_config, SD15_SCHEDULE))


def guided_step_inputs(unet, latent: int, device: torch.device | str, dtype: torch.dtype,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, context) of one guided step of `unet`: batch 2 (CFG), `latent` x `latent` latents, 77 random text
    tokens, t = 501."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, latent, latent, device=device, dtype=dtype, generator=g)
    c = torch.randn(2, 77, unet.config.context_dim, device=device, dtype=dtype, generator=g)
    return x, torch.tensor([501.0, 501.0], device=device), c


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference||, in float32: how far a fast or low-precision path moved the output."""
    reference = reference.float()
    return ((output.float() - reference).norm() / reference.norm()).item()


def _diffusers_twin(module: nn.Module, class_name: str, config_to_diffusers, weights_to_diffusers):
    """diffusers' `class_name` built from our module's config, holding its weights, on its device and in its dtype."""
    import diffusers

    p = next(module.parameters())
    with torch.device(p.device):
        peer = getattr(diffusers, class_name)(**config_to_diffusers(module.config))
    peer.load_state_dict(weights_to_diffusers(module.state_dict(), module.config))
    return peer.to(p.dtype)


def diffusers_unet(unet: UNetModel):
    """diffusers' UNet2DConditionModel holding the same weights as our `unet`."""
    return _diffusers_twin(unet, "UNet2DConditionModel", unet_config_to_diffusers, unet_original_to_diffusers)


def diffusers_vae(autoencoder: AutoencoderKL):
    """diffusers' AutoencoderKL holding the same weights as ours."""
    return _diffusers_twin(autoencoder, "AutoencoderKL", vae_config_to_diffusers, vae_original_to_diffusers)


def diffusers_pipeline(parts: ModelParts, device: torch.device | str, dtype: torch.dtype,
                       folder: str | Path | None = None):
    """diffusers' StableDiffusionPipeline (DDIM scheduler, no safety checker) loaded from `parts` saved in its
    format: the same weights, tokenizer and schedule as ours."""
    import diffusers

    folder = Path(folder or tempfile.mkdtemp(prefix="ldm-bench-")) / "diffusers"
    if not folder.exists():
        save_diffusers(parts, folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
