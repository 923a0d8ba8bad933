"""The x4 upscaler's `latent_upscale` section in diffusers' and CompVis' layouts (pure translation, no files).

diffusers: `StableDiffusionUpscalePipeline` folders carry a `low_res_scheduler/` (a DDPMScheduler config) and
`max_noise_level` in model_index.json. CompVis: `LatentUpscaleDiffusion` with a `low_scale_config`
(`ImageConcatWithNoiseAugmentation`: `noise_schedule_config` and `max_noise_level`) and `conditioning_key:
hybrid-adm` (the low-res image concatenated, the noise level as the class label).
"""
from __future__ import annotations

from typing import Mapping

from ldm.config import from_dict, to_plain
from ldm.diffusion.latent_upscale import SECTION, LatentUpscaleConfig
from ldm.errors import ConfigError

LATENT_UPSCALE_SECTION = SECTION  # the config section this module translates

UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
LOW_RES_SCHEDULER = "low_res_scheduler"
UPSCALE_TARGET = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
LOW_SCALE_TARGET = "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation"
# x4-upscaling.yaml's LatentUpscaleDiffusion settings: what a single file without its YAML is assumed to use
X4_DIFFUSION = {"linear_start": 0.0001, "linear_end": 0.02, "scale_factor": 0.08333, "image_size": 128}
X4_HEADS = 8  # its U-Net's num_heads (heads leave no trace in the shapes)
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
_COMPVIS_BETAS = {"linear": "scaled_linear", "sqrt_linear": "linear"}  # CompVis name -> diffusers name


def _section(values: Mapping, where: str) -> dict:
    return to_plain(from_dict(LatentUpscaleConfig, dict(values), where=where))


def is_upscale_pipeline(index: Mapping) -> bool:
    """Whether a diffusers model_index.json describes a StableDiffusionUpscalePipeline."""
    return index.get("_class_name") == UPSCALE_PIPELINE or LOW_RES_SCHEDULER in index


def section_from_diffusers(index: Mapping, low_res_scheduler: Mapping) -> dict:
    """The `latent_upscale` section from model_index.json and low_res_scheduler/scheduler_config.json."""
    values = {k: low_res_scheduler[k] for k in _SCHEDULE_KEYS if k in low_res_scheduler}
    if low_res_scheduler.get("trained_betas") is not None:
        raise ConfigError(f"{LOW_RES_SCHEDULER}: explicit trained_betas are not supported (a beta_schedule only)")
    if "max_noise_level" in index:
        values["max_noise_level"] = int(index["max_noise_level"])
    return _section(values, f"{LOW_RES_SCHEDULER} config")


def diffusers_entries(section: Mapping) -> tuple[dict, dict]:
    """(model_index.json entries, low_res_scheduler config) of a `latent_upscale` section."""
    config = from_dict(LatentUpscaleConfig, dict(section), where=SECTION)
    scheduler = {"_class_name": "DDPMScheduler", **{k: getattr(config, k) for k in _SCHEDULE_KEYS},
                 "clip_sample": False}
    index = {"_class_name": UPSCALE_PIPELINE, LOW_RES_SCHEDULER: ["diffusers", "DDPMScheduler"],
             "max_noise_level": config.max_noise_level, "watermarker": [None, None]}
    return index, scheduler


def section_from_original(params: Mapping, where: str) -> dict | None:
    """The `latent_upscale` section of CompVis `model.params`, or None for a model without `low_scale_config`."""
    low = params.get("low_scale_config")
    if low is None:
        return None
    low_params = (low.get("params") or {}) if isinstance(low, Mapping) else {}
    schedule = low_params.get("noise_schedule_config") or {}
    betas = schedule.get("beta_schedule", "linear")
    if betas not in _COMPVIS_BETAS:
        raise ConfigError(f"{where}: low_scale_config beta_schedule {betas!r} is not one of {list(_COMPVIS_BETAS)}")
    values = {"beta_schedule": _COMPVIS_BETAS[betas]}
    for ours, theirs in (("beta_start", "linear_start"), ("beta_end", "linear_end"),
                         ("num_train_timesteps", "timesteps")):
        if theirs in schedule:
            values[ours] = schedule[theirs]
    if "max_noise_level" in low_params:
        values["max_noise_level"] = int(low_params["max_noise_level"])
    return _section(values, f"{where}: low_scale_config")


def add_to_original(config: dict, section: Mapping) -> dict:
    """An original-layout config (`model.target`, `model.params`) made a LatentUpscaleDiffusion for `section`."""
    up = from_dict(LatentUpscaleConfig, dict(section), where=SECTION)
    betas = {v: k for k, v in _COMPVIS_BETAS.items()}
    if up.beta_schedule not in betas:
        raise ConfigError(f"{SECTION}.beta_schedule {up.beta_schedule!r} has no CompVis form")
    params = dict(config["model"]["params"])
    params.update(conditioning_key="hybrid-adm", low_scale_key="lr", low_scale_config={
        "target": LOW_SCALE_TARGET,
        "params": {"noise_schedule_config": {"linear_start": up.beta_start, "linear_end": up.beta_end,
                                             "timesteps": up.num_train_timesteps,
                                             "beta_schedule": betas[up.beta_schedule]},
                   "max_noise_level": up.max_noise_level}})
    return {**config, "model": {**config["model"], "target": UPSCALE_TARGET, "params": params}}
