"""diffusers pipeline folders: model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/, read and written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ldm.atomic import atomic_path, atomic_write_text
from ldm.config import to_plain
from ldm.diffusion.schedules import SIGMA_CONFIG_KEYS, ScheduleConfig, sampling_keys_note
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.io.checkpoint import read_state_dict, weight_file_names, write_safetensors
from ldm.io.components import ModelParts, check_can_hold, make_parts, text_config
from ldm.io.keys_text import hf_clip_config_from_openclip, hf_clip_to_openclip, openclip_to_hf_clip
from ldm.io.keys_unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_diffusers_to_original, \
    unet_original_to_diffusers
from ldm.io.latent_upscale_format import (LATENT_UPSCALE_SECTION, LOW_RES_SCHEDULER, diffusers_entries,
                                          is_upscale_pipeline, section_from_diffusers)
from ldm.io.keys_vae import vae_config_from_diffusers, vae_config_to_diffusers, vae_diffusers_to_original, \
    vae_original_to_diffusers
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.tokenizers import clip_tokenizer, save_tokenizer
from ldm.textfiles import read_text

DIFFUSERS_VERSION = "0.30.0"  # the config semantics written here (read by every later diffusers)
_CLIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "attention_dropout",
              "initializer_range", "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id")
_SUPPORTED_TEXT = ("CLIPTextModel", "CLIPTextModelWithProjection")


def is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder (model_index.json, or at least unet/config.json)."""
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (a diffusers pipeline folder has unet/, vae/, text_encoder/, "
                              "tokenizer/ and scheduler/ with their config files)")
    try:
        return json.loads(read_text(path, "config file"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _read_weights(folder: Path, stem: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], str]:
    """`stem`.safetensors / .bin, a sharded index, or an fp16 variant (`weight_file_names`); returns (state dict,
    what was read)."""
    for name, is_index in weight_file_names(stem):
        path = folder / name
        if not path.is_file():
            continue
        if not is_index:
            return read_state_dict(path, allow_pickle=allow_pickle), str(path)
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise CheckpointError(f"{path}: a shard index without a `weight_map` (tensor name -> shard file)")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{path} names the shard {shard}, which is not in {folder}; download the "
                                      "component's files again")
            sd.update(read_state_dict(folder / shard, allow_pickle=allow_pickle))
        return sd, str(path)
    raise CheckpointError(f"no weights in {folder} (expected {stem}.safetensors, {stem}.bin, a sharded "
                          f"{stem}.safetensors.index.json, or their fp16 variants)")


def _text_encoder(folder: Path, allow_pickle: bool) -> tuple[TextEncoderConfig, dict, str]:
    cfg = _read_json(folder / "config.json")
    arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in _SUPPORTED_TEXT and cfg.get("model_type") not in ("clip_text_model", "clip"):
        raise ConfigError(f"{folder}/config.json: text encoder {arch!r} is not supported (CLIPTextModel only)")
    hf_cfg = cfg.get("text_config", cfg) if cfg.get("model_type") == "clip" else cfg
    sd, source = _read_weights(folder, "model", allow_pickle)
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if k != "text_model.embeddings.position_ids"}
    sd.pop("embeddings.position_ids", None)
    if hf_cfg.get("hidden_act") == "gelu":
        # An OpenCLIP text tower exported by diffusers' SD-2 converter: 23 of 24 blocks (SD-2 uses the
        # penultimate one); rebuilt as open_clip with an identity block in place of the unused last one.
        layers = hf_cfg["num_hidden_layers"] + 1
        text_cfg = dict(context_length=hf_cfg.get("max_position_embeddings", 77), vocab_size=hf_cfg["vocab_size"],
                        width=hf_cfg["hidden_size"], heads=hf_cfg["num_attention_heads"], layers=layers,
                        mlp_ratio=hf_cfg["intermediate_size"] / hf_cfg["hidden_size"])
        projection = sd.pop("text_projection.weight", None)
        embed_dim = projection.shape[0] if projection is not None else hf_cfg["hidden_size"]
        config = TextEncoderConfig(type="openclip", layer="penultimate",
                                   open_clip={"embed_dim": embed_dim, "text_cfg": text_cfg, "quick_gelu": False})
        weights = hf_clip_to_openclip(sd, prefix="model.", pad_last_layer=True,
                                      text_projection=projection.t().contiguous() if projection is not None else None)
        return config, weights, source
    sd.pop("text_projection.weight", None)
    config = TextEncoderConfig(type="clip", layer="last", hf_config={k: hf_cfg[k] for k in _CLIP_KEYS if k in hf_cfg})
    return config, {"transformer.text_model." + k: v for k, v in sd.items()}, source


def load_diffusers(folder: str | Path, *, device="cpu", dtype=None, allow_pickle: bool = False,
                   prediction_type: str | None = None) -> ModelParts:
    """Load a diffusers Stable Diffusion pipeline folder, configured from its own config files."""
    folder = Path(folder)
    notes = [f"diffusers pipeline folder {folder}"]
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_cfg = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    if not scheduler_cfg:
        notes.append("no scheduler/scheduler_config.json; using the default SD schedule")
    schedule = ScheduleConfig.from_diffusers(scheduler_cfg)
    notes += [note for note in (sampling_keys_note(scheduler_cfg),) if note]
    learn_sigma = scheduler_cfg.get("variance_type") in ("learned", "learned_range")
    try:
        unet_cfg = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"), learn_sigma=learn_sigma)
        vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from e
    unet_sd, unet_src = _read_weights(folder / "unet", "diffusion_pytorch_model", allow_pickle)
    vae_sd, vae_src = _read_weights(folder / "vae", "diffusion_pytorch_model", allow_pickle)
    text_cfg, text_sd, text_src = _text_encoder(folder / "text_encoder", allow_pickle)
    try:
        weights = {"unet": unet_diffusers_to_original(unet_sd, unet_cfg),
                   "autoencoder": vae_diffusers_to_original(vae_sd, vae_cfg), "text_encoder": text_sd}
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    tokenizer = folder / "tokenizer"
    tokenizer_dir = tokenizer if text_cfg.type == "clip" and tokenizer.is_dir() else None
    if text_cfg.type == "clip" and tokenizer_dir is None:
        notes.append("no tokenizer/ folder; using the CLIP BPE tokenizer that open_clip ships (SD-1 padding)")
    sections = {"unet": unet_cfg, "autoencoder": vae_cfg, "text_encoder": text_cfg, "scheduler": schedule}
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    upscale = None
    if is_upscale_pipeline(index):  # the SD x4 upscaler: the low-res image's own noise schedule
        try:
            upscale = section_from_diffusers(index, _read_json(folder / LOW_RES_SCHEDULER / "scheduler_config.json"))
        except ConfigError as e:
            raise ConfigError(f"{folder}: {e}") from e
    parts = make_parts(sections, weights, source=str(folder), sources={"unet": unet_src, "autoencoder": vae_src,
                       "text_encoder": text_src}, device=device, dtype=dtype, prediction_type=prediction_type,
                       notes=notes, tokenizer_dir=tokenizer_dir)
    if upscale is not None:
        parts.config[LATENT_UPSCALE_SECTION] = upscale
    return parts


def _write_json(path: Path, data: Mapping) -> None:
    atomic_write_text(path, json.dumps(to_plain(data), indent=2, sort_keys=True) + "\n")


def _text_encoder_files(components: ModelParts) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(CLIPTextConfig dict, `text_model.*` weights, tokenizer) of the diffusers text_encoder/ and tokenizer/."""
    from transformers import CLIPTextConfig

    cfg = text_config(components.config["text_encoder"])
    sd = components.text_encoder.state_dict()
    if cfg.type == "clip":
        hf_config = components.text_encoder.hf_model.config.to_dict()
        weights = {"text_model." + k.removeprefix("transformer.text_model."): v for k, v in sd.items()}
        return hf_config, weights, components.text_encoder.tokenizer
    if cfg.type != "openclip":
        raise LdmError(f"a diffusers Stable Diffusion folder holds a CLIP text encoder, not {cfg.type!r}")
    if cfg.layer == "last":
        raise LdmError("diffusers' CLIPTextModel cannot express an OpenCLIP encoder read at its last layer "
                       "(SD-2 uses layer: penultimate)")
    open_clip_cfg = dict(cfg.open_clip or {"name": "ViT-H-14"})
    if "name" in open_clip_cfg:
        import open_clip

        open_clip_cfg = {**open_clip.get_model_config(open_clip_cfg.pop("name")), **open_clip_cfg}
    hf_config = CLIPTextConfig(**hf_clip_config_from_openclip(open_clip_cfg, drop_last_layer=True)).to_dict()
    weights = openclip_to_hf_clip(sd, prefix="model.", hf_prefix="text_model.", drop_last_layer=True)
    return hf_config, weights, clip_tokenizer(pad_token="!")  # diffusers' SD-2 tokenizer pads with "!" (id 0)


def scheduler_class(schedule: ScheduleConfig) -> str:
    """The diffusers scheduler class that can run this schedule."""
    return "EDMEulerScheduler" if schedule.is_edm else "DDIMScheduler"


def scheduler_config_dict(schedule: ScheduleConfig) -> dict:
    """A diffusers scheduler config for the schedule (None entries left to diffusers' defaults)."""
    if schedule.is_edm:  # diffusers' EDM schedulers call the EDM preconditioned network "epsilon"
        return {"_class_name": "EDMEulerScheduler", "_diffusers_version": DIFFUSERS_VERSION, "prediction_type": "epsilon",
                "sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max, "sigma_data": schedule.sigma_data,
                "rho": schedule.rho, "num_train_timesteps": schedule.num_train_timesteps}
    cfg = {k: v for k, v in to_plain(schedule).items() if v is not None}
    # the sampling choices only where the model makes one (DDIMScheduler itself has neither key)
    for key in SIGMA_CONFIG_KEYS:
        if not cfg.get(key):
            cfg.pop(key, None)
    if cfg.get("final_sigmas_type") == "zero":
        cfg.pop("final_sigmas_type", None)
    if cfg.get("beta_schedule") == "cosine":
        cfg["beta_schedule"] = "squaredcos_cap_v2"
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **cfg}


def save_diffusers(components: ModelParts, folder: str | Path) -> None:
    """Write a diffusers StableDiffusionPipeline folder (the whole folder appears at once)."""
    check_can_hold(components, "a diffusers StableDiffusionPipeline folder")
    unet_cfg, vae_cfg = components.unet.config, components.autoencoder.config
    # translate everything before writing anything: unsupported settings fail with nothing on disk
    files = {
        "unet": ({**unet_config_to_diffusers(unet_cfg), "_diffusers_version": DIFFUSERS_VERSION},
                 unet_original_to_diffusers(components.unet.state_dict(), unet_cfg)),
        "vae": ({**vae_config_to_diffusers(vae_cfg), "_diffusers_version": DIFFUSERS_VERSION},
                vae_original_to_diffusers(components.autoencoder.state_dict(), vae_cfg)),
    }
    text_hf_config, text_weights, tokenizer = _text_encoder_files(components)
    pipeline = "StableDiffusionInpaintPipeline" if unet_cfg.in_channels == 9 else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION, "feature_extractor": [None, None],
             "image_encoder": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", scheduler_class(components.schedule)], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    low_res_scheduler = None
    if components.config.get(LATENT_UPSCALE_SECTION) is not None:  # the SD x4 upscaler's pipeline
        upscale_index, low_res_scheduler = diffusers_entries(components.config[LATENT_UPSCALE_SECTION])
        index = {k: v for k, v in index.items() if k not in ("image_encoder", "requires_safety_checker")}
        index.update(upscale_index)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, (config, weights) in files.items():
            _write_json(tmp / name / "config.json", config)
            write_safetensors(weights, tmp / name / "diffusion_pytorch_model.safetensors")
        _write_json(tmp / "text_encoder" / "config.json",
                    {**text_hf_config, "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"})
        write_safetensors(text_weights, tmp / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        save_tokenizer(tokenizer, tmp / "tokenizer")
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config_dict(components.schedule))
        if low_res_scheduler is not None:
            _write_json(tmp / LOW_RES_SCHEDULER / "scheduler_config.json",
                        {**low_res_scheduler, "_diffusers_version": DIFFUSERS_VERSION})
        _write_json(tmp / "model_index.json", index)
