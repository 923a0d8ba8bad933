"""SDXL diffusers folders (StableDiffusionXLPipeline, the refiner's StableDiffusionXLImg2ImgPipeline), read and
written: unet/ vae/ text_encoder/ (not in the refiner) text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ldm.atomic import atomic_path
from ldm.diffusion.schedules import ScheduleConfig, sampling_keys_note
from ldm.errors import CheckpointError, ConfigError
from ldm.io.checkpoint import write_safetensors
from ldm.io.components import ModelParts, make_parts
from ldm.io.diffusers_format import (DIFFUSERS_VERSION, _read_json, _read_weights, _write_json, scheduler_class,
                                     scheduler_config_dict)
from ldm.io.keys_sdxl import hf_configs, sdxl_text_config_from_hf, sdxl_text_from_diffusers, sdxl_text_to_diffusers
from ldm.io.keys_unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_diffusers_to_original, \
    unet_original_to_diffusers
from ldm.io.keys_vae import vae_config_from_diffusers, vae_config_to_diffusers, vae_diffusers_to_original, \
    vae_original_to_diffusers
from ldm.io.part_types import read_section
from ldm.models.micro_conditioning import SDXL_BASE, SDXL_REFINER
from ldm.models.tokenizers import save_tokenizer

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def is_sdxl_folder(folder: Path) -> bool:
    """A diffusers SDXL folder: its model_index.json names an SDXL pipeline, or it has text_encoder_2/."""
    index = folder / "model_index.json"
    if index.is_file() and _read_json(index).get("_class_name") in SDXL_PIPELINES:
        return True
    return (folder / "text_encoder_2" / "config.json").is_file()


def _text_weights(folder: Path, allow_pickle: bool) -> tuple[dict, str]:
    sd, source = _read_weights(folder, "model", allow_pickle)
    return {k.removeprefix("text_model."): v for k, v in sd.items()}, source


def load_sdxl_diffusers(folder: str | Path, *, device="cpu", dtype=None, allow_pickle: bool = False,
                        prediction_type: str | None = None) -> ModelParts:
    """Load an SDXL base or refiner diffusers folder, configured from its own config files."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    refiner = bool(index.get("requires_aesthetics_score", False))
    notes = [f"diffusers SDXL {'refiner ' if refiner else ''}pipeline folder {folder}"]
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_cfg = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    schedule = ScheduleConfig.from_diffusers(scheduler_cfg)
    notes += [note for note in (sampling_keys_note(scheduler_cfg),) if note]
    has_clip = (folder / "text_encoder" / "config.json").is_file()
    try:
        unet_cfg = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"),
                                              micro_conditioning=SDXL_REFINER if refiner else SDXL_BASE)
        vae_json = _read_json(folder / "vae" / "config.json")
        # diffusers' AutoencoderKL defaults force_upcast to True, and SDXL pipelines honour it
        vae_cfg = dataclasses.replace(vae_config_from_diffusers(vae_json),
                                      force_upcast=bool(vae_json.get("force_upcast", True)))
        text_cfg = sdxl_text_config_from_hf(
            _read_json(folder / "text_encoder" / "config.json") if has_clip else None,
            _read_json(folder / "text_encoder_2" / "config.json"),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", not refiner)))
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from e
    if not unet_cfg.micro_conditioning:
        raise ConfigError(f"{folder}: an SDXL folder whose U-Net has no addition_embed_type 'text_time'")
    unet_sd, unet_src = _read_weights(folder / "unet", "diffusion_pytorch_model", allow_pickle)
    vae_sd, vae_src = _read_weights(folder / "vae", "diffusion_pytorch_model", allow_pickle)
    first, first_src = _text_weights(folder / "text_encoder", allow_pickle) if has_clip else (None, "")
    second, second_src = _text_weights(folder / "text_encoder_2", allow_pickle)
    try:
        weights = {"unet": unet_diffusers_to_original(unet_sd, unet_cfg),
                   "autoencoder": vae_diffusers_to_original(vae_sd, vae_cfg),
                   "text_encoder": sdxl_text_from_diffusers(first, second)}
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    sections = {"unet": unet_cfg, "autoencoder": vae_cfg, "text_encoder": text_cfg, "scheduler": schedule}
    sources = {"unet": unet_src, "autoencoder": vae_src, "text_encoder": " + ".join(s for s in (first_src, second_src)
                                                                                    if s)}
    return make_parts(sections, weights, source=str(folder), sources=sources, device=device, dtype=dtype,
                      prediction_type=prediction_type, notes=notes)


def save_sdxl_diffusers(parts: ModelParts, folder: str | Path) -> None:
    """Write a diffusers SDXL folder (the refiner as StableDiffusionXLImg2ImgPipeline); it appears at once."""
    from transformers import CLIPTextConfig

    unet_cfg, vae_cfg = parts.unet.config, parts.autoencoder.config
    text_cfg = read_section("text_encoder", parts.config["text_encoder"])
    refiner = text_cfg.clip is None
    first, second = sdxl_text_to_diffusers(parts.text_encoder.state_dict(), text_cfg)
    first_cfg, second_cfg = hf_configs(text_cfg)
    files = {
        "unet": ({**unet_config_to_diffusers(unet_cfg), "_diffusers_version": DIFFUSERS_VERSION},
                 unet_original_to_diffusers(parts.unet.state_dict(), unet_cfg)),
        "vae": ({**vae_config_to_diffusers(vae_cfg), "force_upcast": vae_cfg.force_upcast,
                 "_diffusers_version": DIFFUSERS_VERSION},
                vae_original_to_diffusers(parts.autoencoder.state_dict(), vae_cfg)),
    }
    texts = {"text_encoder_2": ("CLIPTextModelWithProjection", second_cfg, second)}
    if not refiner:
        texts["text_encoder"] = ("CLIPTextModel", first_cfg, first)
    encoder = parts.text_encoder
    tokenizers = {"tokenizer_2": encoder.bigg_tokenizer}
    if not refiner:
        tokenizers["tokenizer"] = encoder.clip.tokenizer
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
             "_diffusers_version": DIFFUSERS_VERSION, "feature_extractor": [None, None], "image_encoder": [None, None],
             "force_zeros_for_empty_prompt": text_cfg.force_zeros_for_empty_prompt,
             "scheduler": ["diffusers", scheduler_class(parts.schedule)], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
             "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"]}
    if refiner:
        index["requires_aesthetics_score"] = True
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, (config, weights) in files.items():
            _write_json(tmp / name / "config.json", config)
            write_safetensors(weights, tmp / name / "diffusion_pytorch_model.safetensors")
        for name, (arch, hf_cfg, weights) in texts.items():
            full = CLIPTextConfig(**hf_cfg).to_dict()
            _write_json(tmp / name / "config.json", {**full, "architectures": [arch], "model_type": "clip_text_model"})
            write_safetensors(weights, tmp / name / "model.safetensors", metadata={"format": "pt"})
        for name, tokenizer in tokenizers.items():
            save_tokenizer(tokenizer, tmp / name)
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config_dict(parts.schedule))
        _write_json(tmp / "model_index.json", index)

