"""Tiny random Stable Diffusion components (SD-1 and SD-2 layouts) shared by the ldm.io tests (holds no tests)."""
import torch

from ldm.diffusion.schedules import ScheduleConfig
from ldm.io.components import SDComponents, resolved_config
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder
from ldm.models.unet import UNetConfig, UNetModel

CLIP_HF = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
OPENCLIP = {"embed_dim": 32, "text_cfg": dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=3,
                                              mlp_ratio=2.0), "quick_gelu": False}


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Replace every parameter (zero-initialised output layers included) with seeded N(0, scale^2) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


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
    """Random tiny components, every weight non-zero."""
    unet_cfg, vae_cfg, text_cfg, schedule = tiny_configs(kind, **unet_overrides)
    unet = randomize(UNetModel(unet_cfg), seed)
    vae = randomize(AutoencoderKL(vae_cfg), seed + 1)
    text = randomize(build_text_encoder(text_cfg), seed + 2, scale=0.05)
    for m in (unet, vae, text):
        m.eval()
    return SDComponents(unet, vae, text, schedule, resolved_config(unet_cfg, vae_cfg, text_cfg, schedule), "tiny")


def unet_inputs(in_channels: int = 4, seed: int = 1):
    """(x b c h w, timesteps b, context b n d) for a tiny U-Net."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, in_channels, 16, 16, generator=g), torch.tensor([10.0, 700.0]),
            torch.randn(2, 7, 32, generator=g))
