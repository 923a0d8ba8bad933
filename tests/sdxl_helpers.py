"""Tiny SDXL models: diffusers' own SDXL test components (tests/pipelines/stable_diffusion_xl), in diffusers classes
and as ldm parts with the same weights.

Two changes from diffusers' `get_dummy_components`: the U-Net's GroupNorms have 32 groups (CompVis' U-Net, ours,
has no other; diffusers' tests use 1), and the text encoders use CLIP's real 49408-token vocabulary, because the
tokenizers are built offline from open_clip's BPE file (diffusers' tests download a 1000-token one).
"""
import json

import torch
from helpers import SEED, realistic_weights

from ldm.models.tokenizers import clip_tokenizer

# diffusers' SDXL test text encoders (CLIPTextConfig), with the real vocabulary and CLIP's special ids
TEXT_HF = dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
               vocab_size=49408, hidden_act="gelu", projection_dim=32, max_position_embeddings=77,
               bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
# diffusers' SDXL test U-Net: 6 micro-conditioning numbers x 8 + the 32-wide pooled text = 80
UNET_KW = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
               transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
               norm_num_groups=32)
# the refiner: bigG only (32 wide), 5 numbers (aesthetic score in place of the target size): 5 x 8 + 32 = 72
REFINER_UNET_KW = {**UNET_KW, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 72}
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                 timestep_spacing="leading")  # diffusers' SDXL tests (EulerDiscreteScheduler)
SDXL_SCHEDULER_EXTRA = dict(clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0)


def tiny_sdxl_diffusers(seed: int = 0, refiner: bool = False, bigg_width: int = 32, bigg_heads: int = 4) -> dict:
    """diffusers' SDXL pipeline components (realistic random weights, eval mode); `refiner`: no text_encoder.

    `bigg_width`: text_encoder_2's width. diffusers' tests make both encoders 32 wide; `from_single_file` tells the
    two towers apart by their widths (768 and 1280 in the real model), so its tests need them to differ.
    `bigg_heads`: its heads; a published file does not store them, and ldm then assumes the real model's 64-wide ones.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED + seed)
    unet_kw = dict(REFINER_UNET_KW if refiner else UNET_KW)
    unet_kw["cross_attention_dim"] += bigg_width - 32
    unet = realistic_weights(diffusers.UNet2DConditionModel(**unet_kw), seed)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  latent_channels=4, sample_size=128)  # diffusers' own initialisation
    config = CLIPTextConfig(**TEXT_HF)
    text_encoder = None if refiner else realistic_weights(CLIPTextModel(config), seed + 2)
    config_2 = CLIPTextConfig(**{**TEXT_HF, "hidden_size": bigg_width, "num_attention_heads": bigg_heads})
    text_encoder_2 = realistic_weights(CLIPTextModelWithProjection(config_2), seed + 3)
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                 tokenizer=None if refiner else clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
                 scheduler=scheduler)
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return parts


def save_diffusers_sdxl(folder, *, seed: int = 0, refiner: bool = False, bigg_width: int = 32, bigg_heads: int = 4):
    """(folder, pipe): a tiny StableDiffusionXL(Img2Img)Pipeline saved as a diffusers folder."""
    import diffusers

    parts = tiny_sdxl_diffusers(seed, refiner, bigg_width, bigg_heads)
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"].startswith("StableDiffusionXL")
    # as stabilityai's SDXL scheduler_config.json: DDIM built from it neither clips x0 nor ends at alpha 1
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **SDXL_SCHEDULER_EXTRA}))
    return folder, pipe


def scheduler_config(folder) -> dict:
    """The folder's scheduler_config.json (what diffusers' other schedulers are built from in the tests)."""
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
