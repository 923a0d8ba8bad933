"""Stability's SDXL single files (`sd_xl_base_1.0.safetensors`, `sd_xl_refiner_1.0.safetensors`) and their sgm YAML
layout (`sd_xl_base.yaml`, `sd_xl_refiner.yaml`), read and written.

Keys: `model.diffusion_model.*` (U-Net), `first_stage_model.*` (autoencoder), `conditioner.embedders.{i}.*` (the
text encoders; the native SDXL text keys are these without `conditioner.`). The architecture comes from an sgm YAML
given or beside the file, from the config ldm stores in the files it writes, or from the tensor shapes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ldm.config import load_yaml, save_yaml, to_plain
from ldm.diffusion.schedules import PREDICTION_ALIASES, ScheduleConfig
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.io.checkpoint import read_safetensors_metadata, write_safetensors
from ldm.io.components import ModelParts, autoencoder_config, make_parts, text_config_from_dims, unet_config
from ldm.io.infer import (CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, config_entry, infer_autoencoder,
                          infer_text_encoder, infer_unet, strip_prefix)
from ldm.io.part_types import read_section
from ldm.io.part_types import section_type
from ldm.models.micro_conditioning import SDXL_BASE, SDXL_REFINER, micro_width
from ldm.models.sdxl_text import SDXLTextConfig

CONDITIONER_PREFIX = "conditioner."
METADATA_KEY = "ldm_config"  # as the SD single files ldm writes
SGM = "sgm.modules.encoders.modules."
CLIP_TARGET, BIGG_TARGET = SGM + "FrozenCLIPEmbedder", SGM + "FrozenOpenCLIPEmbedder2"
SIZE_TARGET = SGM + "ConcatTimestepEmbedderND"
# sgm's input keys of the micro-conditioning embedders <-> our names
INPUT_KEYS = {"original_size": "original_size_as_tuple", "crops_coords_top_left": "crop_coords_top_left",
              "target_size": "target_size_as_tuple", "aesthetic_score": "aesthetic_score"}
_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}
SDXL_SCALE_FACTOR = 0.13025  # sd_xl_base.yaml's scale_factor (the SDXL VAE's latent std)


def is_sdxl(parts: ModelParts) -> bool:
    """Whether a model is SDXL (its text encoder is SDXL's pair)."""
    return "text_encoder" in parts and section_type("text_encoder", parts.config["text_encoder"]) == "sdxl"


def is_sdxl_original(sd: Mapping[str, torch.Tensor]) -> bool:
    """An sgm single file: its text encoders are under `conditioner.embedders.`."""
    return any(k.startswith(CONDITIONER_PREFIX + "embedders.") for k in sd)


def _embedders(sd: Mapping[str, torch.Tensor]) -> dict[int, str]:
    """Embedder index -> 'clip' | 'openclip' for the text embedders in a state dict (native text keys)."""
    kinds = {}
    for key in sd:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "embedders":
            kinds[int(parts[1])] = "clip" if parts[2] == "transformer" else "openclip"
    return kinds


def text_config_from_weights(text: Mapping[str, torch.Tensor], force_zeros: bool) -> SDXLTextConfig:
    """SDXLTextConfig read off native SDXL text weights (CLIP and OpenCLIP heads assumed 64 wide, as published)."""
    kinds = _embedders(text)
    if sorted(kinds.values()) not in (["clip", "openclip"], ["openclip"]):
        raise CheckpointError(f"SDXL text encoders: expected CLIP ViT-L + OpenCLIP or OpenCLIP alone, found "
                              f"{[kinds[i] for i in sorted(kinds)]}")
    clip = None
    for index, kind in kinds.items():
        inner = strip_prefix(text, f"embedders.{index}.")
        prefix = CLIP_PREFIX.removesuffix("transformer.text_model.") if kind == "clip" \
            else OPENCLIP_PREFIX.removesuffix("model.")
        dims = infer_text_encoder({prefix + k: v for k, v in inner.items()})
        if kind == "clip":
            clip = text_config_from_dims(dims).hf_config
        else:
            open_clip_cfg = text_config_from_dims(dims).open_clip
    return SDXLTextConfig(clip=clip, open_clip=open_clip_cfg, force_zeros_for_empty_prompt=force_zeros)


def infer_sdxl_sections(sd: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Config objects by role for an SDXL single file, read from the tensor shapes; and notes on what was assumed."""
    text = strip_prefix(sd, CONDITIONER_PREFIX)
    refiner = "clip" not in _embedders(text).values()
    text_cfg = text_config_from_weights(text, force_zeros=not refiner)
    unet = infer_unet(sd)
    unet.pop("use_spatial_transformer"), unet.pop("legacy")
    unet.pop("num_classes", None)
    names = SDXL_REFINER if refiner else SDXL_BASE
    pooled = text_cfg.open_clip["embed_dim"]
    extra = unet["adm_in_channels"] - pooled
    if extra <= 0 or extra % micro_width(names):
        raise CheckpointError(f"label_emb takes {unet['adm_in_channels']} inputs: not the {pooled}-wide pooled text "
                              f"plus {micro_width(names)} embedded numbers ({', '.join(names)})")
    unet.update(micro_conditioning=names, micro_conditioning_dim=extra // micro_width(names), sample_size=128)
    ae = infer_autoencoder(sd)
    autoencoder = {**ae["ddconfig"], "embed_dim": ae["embed_dim"], "scale_factor": SDXL_SCALE_FACTOR,
                   "force_upcast": True}  # SDXL's VAE overflows in fp16
    schedule = ScheduleConfig(steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    notes = [f"architecture inferred from tensor shapes: SDXL {'refiner' if refiner else 'base'} "
             f"(model_channels={unet['model_channels']}, channel_mult={unet['channel_mult']}, "
             f"transformer_depth={unet['transformer_depth']}, context_dim={unet['context_dim']})",
             "attention heads are not stored in the weights; assumed SDXL's 64-channel heads; scale_factor "
             f"{SDXL_SCALE_FACTOR}, eps prediction (sd_xl_base.yaml); the VAE decodes in float32 under fp16 "
             "(force_upcast; a fixed fp16 VAE can be given with --vae)"]
    return {"unet": unet_config(unet), "autoencoder": autoencoder_config(autoencoder), "text_encoder": text_cfg,
            "scheduler": schedule}, notes


SGM_LAYOUT = "sgm's layout model.params.{network_config,conditioner_config,first_stage_config}"


def _get(node: Mapping, path: str, where: str):
    return config_entry(node, path, where, SGM_LAYOUT)


def sections_from_sgm_config(config: Mapping, sd: Mapping[str, torch.Tensor], *, where: str) -> dict:
    """Config objects by role from an sgm YAML (text-encoder sizes from the weights, which the YAML does not hold)."""
    params = _get(config, "model.params", where)
    unet = dict(_get(params, "network_config.params", where))
    unet.pop("num_classes", None)
    names, dims = [], set()
    refiner = True
    for emb in _get(params, "conditioner_config.params.emb_models", where):
        target = str(emb.get("target", ""))
        if target == CLIP_TARGET:
            refiner = False
        elif target == SIZE_TARGET:
            found = [n for n, k in INPUT_KEYS.items() if k == emb.get("input_key")]
            if not found:
                raise ConfigError(f"{where}: micro-conditioning input_key {emb.get('input_key')!r} is not one of "
                                  f"{list(INPUT_KEYS.values())}")
            names.append(found[0])
            dims.add(int((emb.get("params") or {}).get("outdim", 256)))
        elif target != BIGG_TARGET:
            raise ConfigError(f"{where}: conditioner embedder {target!r} is not supported (SDXL's CLIP, OpenCLIP "
                              "bigG and ConcatTimestepEmbedderND)")
    if len(dims) > 1:
        raise ConfigError(f"{where}: micro-conditioning embedders of different widths {sorted(dims)}")
    unet.update(micro_conditioning=tuple(names), micro_conditioning_dim=dims.pop() if dims else 256,
                sample_size=128)
    first = _get(params, "first_stage_config.params", where)
    autoencoder = {**_get(first, "ddconfig", where), "embed_dim": first.get("embed_dim", 4),
                   "scale_factor": float(params.get("scale_factor", SDXL_SCALE_FACTOR)), "force_upcast": True}
    scaling = str(_get(params, "denoiser_config.params.scaling_config.target", where)).rsplit(".", 1)[-1]
    if scaling not in _SCALINGS:
        raise ConfigError(f"{where}: denoiser scaling {scaling!r} is not one of {list(_SCALINGS)}")
    text = text_config_from_weights(strip_prefix(sd, CONDITIONER_PREFIX), force_zeros=not refiner)
    return {"unet": unet_config(unet), "autoencoder": autoencoder_config(autoencoder), "text_encoder": text,
            "scheduler": ScheduleConfig(prediction_type=_SCALINGS[scaling], steps_offset=1, set_alpha_to_one=False,
                                        timestep_spacing="leading")}


def sgm_config(parts: ModelParts) -> dict:
    """The model's architecture as an sgm YAML (the layout of sd_xl_base.yaml / sd_xl_refiner.yaml)."""
    unet = {k: (list(v) if isinstance(v, tuple) else v) for k, v in to_plain(parts.unet.config).items()
            if v is not None and k not in ("micro_conditioning", "micro_conditioning_dim", "sample_size",
                                           "learn_sigma", "use_checkpoint", "dropout", "conv_resample")}
    for key in ("num_heads", "num_head_channels"):
        if unet.get(key) == -1:
            unet.pop(key)
    unet["num_classes"] = "sequential"
    text: SDXLTextConfig = read_section("text_encoder", parts.config["text_encoder"])
    emb = []
    if text.clip is not None:
        emb.append({"is_trainable": False, "input_key": "txt", "target": CLIP_TARGET,
                    "params": {"layer": "hidden", "layer_idx": text.clip.get("num_hidden_layers", 12) - 1}})
    emb.append({"is_trainable": False, "input_key": "txt", "target": BIGG_TARGET,
                "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                           "layer": "penultimate", "always_return_pooled": True, "legacy": False}})
    dim = parts.unet.config.micro_conditioning_dim
    emb += [{"is_trainable": False, "input_key": INPUT_KEYS[n], "target": SIZE_TARGET, "params": {"outdim": dim}}
            for n in parts.unet.config.micro_conditioning]
    ae = {k: (list(v) if isinstance(v, tuple) else v) for k, v in to_plain(parts.autoencoder.config).items()}
    scale, embed_dim = ae.pop("scale_factor"), ae.pop("embed_dim")
    for key in ("shift_factor", "norm_groups", "force_upcast"):
        ae.pop(key, None)
    prediction = parts.schedule.prediction_type
    scaling = {v: k for k, v in _SCALINGS.items()}.get(prediction)
    if scaling is None:
        raise LdmError(f"the sgm single-file format holds eps or v models, not {prediction!r}; save it with --to "
                       "native")
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": scale, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": parts.schedule.num_train_timesteps,
            "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": emb}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": embed_dim, "ddconfig": ae, "lossconfig": {"target": "torch.nn.Identity"}}},
    }}}


def load_sdxl_original(path: Path, sd: Mapping[str, torch.Tensor], notes: list[str], *, device="cpu", dtype=None,
                       config: str | Path | Mapping | None = None, prediction_type: str | None = None) -> ModelParts:
    """An SDXL single file (EMA already chosen, `sd` read from `path`) as model parts."""
    metadata = read_safetensors_metadata(path).get(METADATA_KEY)
    beside = path.with_suffix(".yaml")
    if config is None and metadata is None and beside.is_file():
        config = beside
    try:
        if config is not None:
            where = str(config) if not isinstance(config, Mapping) else "sgm config"
            original = load_yaml(config) if not isinstance(config, Mapping) else config
            sections = sections_from_sgm_config(original, sd, where=where)
            notes.append(f"architecture from {where}; text-encoder sizes read from the weights")
        elif metadata is not None:
            resolved = json.loads(metadata)
            sections = {role: read_section(role, resolved[role]) for role in ("unet", "autoencoder", "text_encoder")}
            sections["scheduler"] = ScheduleConfig.from_diffusers(resolved["scheduler"])
            notes.append(f"architecture from the config stored in {path.name} by ldm")
        else:
            sections, inferred = infer_sdxl_sections(sd)
            notes += inferred
    except (ConfigError, CheckpointError) as e:
        raise type(e)(f"{path}: {e}") from e
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot read the SDXL architecture from the weights (no {e}); pass "
                              "sd_xl_base.yaml / sd_xl_refiner.yaml with --config") from e
    if prediction_type is not None:
        prediction_type = PREDICTION_ALIASES.get(prediction_type, prediction_type)
    text = strip_prefix(sd, CONDITIONER_PREFIX)
    dropped = [k for k in text if k.endswith(".model.logit_scale")]  # the unused contrastive temperature
    if dropped:
        notes.append(f"ignored {dropped[0]} (OpenCLIP's contrastive temperature; text encoding does not use it)")
    # ... and a buffer that transformers 5 no longer saves
    text = {k: v for k, v in text.items() if k not in dropped and not k.endswith("embeddings.position_ids")}
    vae = {k: v for k, v in strip_prefix(sd, VAE_PREFIX).items() if not k.startswith("loss.")}
    ignored = [k for k in sd if not k.startswith((UNET_PREFIX, VAE_PREFIX, CONDITIONER_PREFIX))]
    if ignored:
        notes.append(f"ignored {len(ignored)} key(s) outside the three networks, e.g. {ignored[0]}")
    weights = {"unet": strip_prefix(sd, UNET_PREFIX), "autoencoder": vae, "text_encoder": text}
    sources = {"unet": f"{path} (U-Net, {UNET_PREFIX}*)", "autoencoder": f"{path} (autoencoder, {VAE_PREFIX}*)",
               "text_encoder": f"{path} (text encoders, {CONDITIONER_PREFIX}embedders.*)"}
    return make_parts(sections, weights, source=str(path), sources=sources, device=device, dtype=dtype,
                      prediction_type=prediction_type, notes=notes)


def save_sdxl_original(parts: ModelParts, path: Path, *, write_yaml: bool = True) -> None:
    """One `.safetensors` with sgm's key prefixes, and the sgm YAML beside it."""
    config = sgm_config(parts)  # fails before anything is written
    sd = {UNET_PREFIX + k: v for k, v in parts.unet.state_dict().items()}
    sd.update({VAE_PREFIX + k: v for k, v in parts.autoencoder.state_dict().items()})
    sd.update({CONDITIONER_PREFIX + k: v for k, v in parts.text_encoder.state_dict().items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(to_plain(parts.config))}
    write_safetensors(sd, path, metadata=metadata)
    if write_yaml:
        save_yaml(config, path.with_suffix(".yaml"))
