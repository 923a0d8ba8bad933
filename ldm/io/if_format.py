"""DeepFloyd IF stages in diffusers folders (IFPipeline, IFSuperResolutionPipeline), read and written.

A folder holds unet/ (UNet2DConditionModel in IF's configuration), text_encoder/ (transformers T5EncoderModel),
tokenizer/ (spiece.model), scheduler/ (DDPMScheduler) and, for stage II, image_noising_scheduler/. The architecture
comes from unet/config.json; the scheduler config gives the schedule, the learned-range variance and IF's dynamic
thresholding (ratio and cap), which become the model's `stage` section with IF's sampling defaults.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ldm.atomic import atomic_path
from ldm.config import from_dict, to_plain
from ldm.diffusion.noise_augmentation import StageConfig, level_from_if_noise_level
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.io.checkpoint import write_safetensors
from ldm.io.components import ModelParts, make_parts, section_type, text_config
from ldm.io.diffusers_format import _read_json, _read_weights, _write_json
from ldm.io.keys_if import (if_config_from_diffusers, if_config_to_diffusers, if_unet_diffusers_to_native,
                            if_unet_native_to_diffusers, is_if_unet_config)
from ldm.models.text_encoders import TextEncoderConfig, hf_config_fields
from ldm.models.tokenizers import save_tokenizer

DIFFUSERS_VERSION = "0.30.0"
IF_PIPELINES = ("IFPipeline", "IFSuperResolutionPipeline", "IFImg2ImgPipeline", "IFImg2ImgSuperResolutionPipeline",
                "IFInpaintingPipeline", "IFInpaintingSuperResolutionPipeline")
IF_NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default noise_level
SR_FACTOR = 4  # IF-II upscales stage I's 64 px images to 256 px
T5_MAX_LENGTH = 77  # the IF pipelines pad and truncate prompts to 77 T5 tokens
# IF's pipeline defaults: (steps, guidance) for stage I and stage II; its scheduler is DDPM
DEFAULTS = {False: (100, 7.0), True: (50, 4.0)}
EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # T5's tied token embeddings


def is_if_folder(path: Path) -> bool:
    """A diffusers folder of an IF stage: an IF pipeline in model_index.json, or an IF-style unet/config.json."""
    index, unet = path / "model_index.json", path / "unet" / "config.json"
    if index.is_file() and _read_json(index).get("_class_name") in IF_PIPELINES:
        return True
    return unet.is_file() and is_if_unet_config(_read_json(unet))


def stage_config(unet_cfg, scheduler: Mapping) -> StageConfig:
    """The `stage` section of an IF stage: sizes, IF-II's noise level, IF's thresholding and sampling defaults."""
    sr = unet_cfg.aug_level_conditioning
    size = unet_cfg.sample_size or 64
    steps, guidance = DEFAULTS[sr]
    threshold = scheduler.get("thresholding", False)
    return StageConfig(
        resolution=size, low_res_size=size // SR_FACTOR if sr else None,
        aug_level=float(level_from_if_noise_level(IF_NOISE_LEVEL)) if sr else 0.0,
        resize_mode="bilinear_align_corners" if sr else "bicubic",
        dynamic_threshold=scheduler.get("dynamic_thresholding_ratio", 0.995) if threshold else None,
        # the cap stays with thresholding off: turned on later (--dynamic-threshold P), diffusers' DDPMScheduler with
        # thresholding=True over this config caps s at sample_max_value (its default 1.0)
        dynamic_threshold_max=scheduler.get("sample_max_value", 1.0),
        steps=steps, guidance=guidance, sampler="ddpm")


def _text_encoder(folder: Path, allow_pickle: bool) -> tuple[TextEncoderConfig, dict]:
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type") != "t5":
        raise ConfigError(f"{folder}/config.json: an IF stage's text encoder is T5 (T5EncoderModel), not "
                          f"{cfg.get('model_type')!r}")
    hf_config = hf_config_fields(cfg)
    sd, _ = _read_weights(folder, "model", allow_pickle)
    for name in EMBEDDINGS:  # transformers writes the tied embedding once
        sd.setdefault(name, sd.get(EMBEDDINGS[0], sd.get(EMBEDDINGS[1])))
    config = TextEncoderConfig(type="t5", max_length=T5_MAX_LENGTH, hf_config=hf_config, zero_padding=False,
                               lowercase=True)
    return config, {f"model.{k}": v for k, v in sd.items() if v is not None}


def load_if_diffusers(folder: str | Path, *, device="cpu", dtype=None, allow_pickle: bool = False,
                      prediction_type: str | None = None) -> ModelParts:
    """Load an IF stage (I or II) from its diffusers folder, configured from its own config files."""
    folder = Path(folder)
    notes = [f"diffusers DeepFloyd IF folder {folder}"]
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    learn_sigma = scheduler.get("variance_type") in ("learned", "learned_range")
    try:
        unet_cfg = if_config_from_diffusers(_read_json(folder / "unet" / "config.json"), learn_sigma=learn_sigma)
        schedule = ScheduleConfig.from_diffusers(scheduler)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from e
    if not (folder / "text_encoder").is_dir():
        raise CheckpointError(f"{folder} has no text_encoder/: copy stage I's text_encoder/ and tokenizer/ into it "
                              "(every IF stage reads the same T5-XXL)")
    unet_sd, unet_src = _read_weights(folder / "unet", "diffusion_pytorch_model", allow_pickle)
    text_cfg, text_sd = _text_encoder(folder / "text_encoder", allow_pickle)
    try:
        weights = {"unet": if_unet_diffusers_to_native(unet_sd, unet_cfg), "text_encoder": text_sd}
    except CheckpointError as e:
        raise CheckpointError(f"{unet_src}: {e}") from e
    sections = {"unet": unet_cfg, "text_encoder": text_cfg, "scheduler": schedule}
    parts = make_parts(sections, weights, source=str(folder), sources={"unet": unet_src,
                       "text_encoder": str(folder / "text_encoder")}, device=device, dtype=dtype,
                       prediction_type=prediction_type, notes=notes, tokenizer_dir=folder / "tokenizer")
    parts.config["stage"] = to_plain(stage_config(unet_cfg, scheduler))
    return parts


def _scheduler_config(schedule: ScheduleConfig, stage: StageConfig, learn_sigma: bool) -> dict:
    cfg = {k: v for k, v in to_plain(schedule).items() if v is not None}
    if cfg.get("beta_schedule") == "cosine":
        cfg["beta_schedule"] = "squaredcos_cap_v2"
    threshold = stage.dynamic_threshold is not None
    cfg.setdefault("variance_type", "learned_range" if learn_sigma else "fixed_small")  # the schedule's own, if any
    cfg["thresholding"] = threshold
    if threshold:
        cfg["dynamic_thresholding_ratio"] = stage.dynamic_threshold
    if threshold or stage.dynamic_threshold_max is not None:  # kept with thresholding off, for when it is turned on
        cfg["sample_max_value"] = stage.dynamic_threshold_max or 1.0
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **cfg}


def save_if_diffusers(parts: ModelParts, folder: str | Path) -> None:
    """Write an IF stage as a diffusers IFPipeline / IFSuperResolutionPipeline folder (it appears at once)."""
    roles = {role: section_type(role, parts.config[role]) for role in parts.roles}
    if roles != {"unet": "if_unet", "text_encoder": "t5"}:
        raise LdmError(f"a diffusers IF folder holds an IF U-Net and a T5 text encoder; this model has {roles}: "
                       "save it in the native format (--to native)")
    unet_cfg = parts.unet.config
    stage = from_dict(StageConfig, parts.config.get("stage") or {}, where="stage")
    sr = unet_cfg.aug_level_conditioning
    unet = ({**if_config_to_diffusers(unet_cfg), "_diffusers_version": DIFFUSERS_VERSION},
            if_unet_native_to_diffusers(parts.unet.state_dict(), unet_cfg))
    text = {k.removeprefix("model."): v for k, v in parts.text_encoder.state_dict().items()}
    if torch.equal(text[EMBEDDINGS[0]], text[EMBEDDINGS[1]]):
        del text[EMBEDDINGS[1]]  # tied: written once, as transformers does
    text_hf = {**(text_config(parts.config["text_encoder"]).hf_config or {}),
               "architectures": ["T5EncoderModel"], "model_type": "t5"}
    index = {"_class_name": "IFSuperResolutionPipeline" if sr else "IFPipeline",
             "_diffusers_version": DIFFUSERS_VERSION, "feature_extractor": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None], "watermarker": [None, None],
             "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5Tokenizer"], "unet": ["diffusers", "UNet2DConditionModel"]}
    if sr:
        index["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        _write_json(tmp / "unet" / "config.json", unet[0])
        write_safetensors(unet[1], tmp / "unet" / "diffusion_pytorch_model.safetensors")
        _write_json(tmp / "text_encoder" / "config.json", text_hf)
        write_safetensors(text, tmp / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        save_tokenizer(parts.text_encoder.tokenizer, tmp / "tokenizer")
        _write_json(tmp / "scheduler" / "scheduler_config.json",
                    _scheduler_config(parts.schedule, stage, unet_cfg.learn_sigma))
        if sr:  # IF-II noises its low-resolution input on the same cosine schedule
            _write_json(tmp / "image_noising_scheduler" / "scheduler_config.json",
                        {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                         "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
        _write_json(tmp / "model_index.json", index)

