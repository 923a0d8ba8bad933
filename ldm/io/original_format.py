"""The original single-file format of CompVis / Stability (`.ckpt` / `.safetensors` with prefixed keys)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ldm.config import load_yaml, save_yaml, to_plain
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.io.checkpoint import read_safetensors_metadata, read_weights, write_safetensors
from ldm.io.components import (ModelParts, autoencoder_config, build_module, check_can_hold, make_parts, text_config,
                               text_config_from_dims, unet_config)
from ldm.io.infer import (CLIP_PREFIX, OPENCLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, infer_original_config,
                          infer_text_encoder, normalize_text_keys, original_config_from_sections,
                          missing_networks, sections_from_original_config, select_ema, strip_prefix, what_else)
from ldm.io.latent_upscale_format import LATENT_UPSCALE_SECTION, add_to_original, section_from_original
from ldm.io.sd2_prediction import noise_slope, sd2_prediction
from ldm.io.sdxl_original import is_sdxl, is_sdxl_original, load_sdxl_original, save_sdxl_original

METADATA_KEY = "ldm_config"  # resolved config stored in the header of the files we write


def _text_weights(sd: Mapping[str, torch.Tensor], kind: str, notes: list[str]) -> dict[str, torch.Tensor]:
    text = strip_prefix(sd, TEXT_PREFIX)
    text.pop("transformer.text_model.embeddings.position_ids", None)  # a buffer transformers 5 no longer saves
    if kind == "openclip":
        visual = [k for k in text if k.startswith("model.visual.")]
        if visual:
            notes.append(f"ignored {len(visual)} OpenCLIP image-tower weights (only the text tower is used)")
            text = {k: v for k, v in text.items() if not k.startswith("model.visual.")}
    return text


def _check_family(path: Path, sd: Mapping[str, torch.Tensor], config: str | Path | Mapping) -> None:
    """A YAML of the other family (an SD-1/2 CompVis YAML for an SDXL file, an SDXL sgm YAML for an SD-1/2 file)
    is refused naming both, before the YAML's layout is read."""
    where = str(config) if not isinstance(config, Mapping) else "the original config"
    original = load_yaml(config) if not isinstance(config, Mapping) else config
    params = (original.get("model") or {}).get("params") if isinstance(original, Mapping) else None
    if not isinstance(params, Mapping):
        return  # the layout check that follows names what is missing
    sdxl_file, sdxl_yaml, compvis_yaml = is_sdxl_original(sd), "network_config" in params, "unet_config" in params
    if sdxl_file and compvis_yaml and not sdxl_yaml:
        raise ConfigError(f"{path} is an SDXL checkpoint (text encoders under conditioner.embedders.*) but {where} "
                          "describes an SD-1/SD-2 model (CompVis unet_config); pass SDXL's own YAML (sd_xl_base.yaml "
                          "or sd_xl_refiner.yaml) or leave --config out to read the architecture from the weights")
    if not sdxl_file and sdxl_yaml and not compvis_yaml:
        raise ConfigError(f"{path} is an SD-1/SD-2 checkpoint (text encoder under cond_stage_model.*) but {where} "
                          "describes an SDXL model (sgm network_config); pass the model's own YAML (e.g. "
                          "v1-inference.yaml, v2-inference-v.yaml) or leave --config out to read the architecture "
                          "from the weights")


def load_original(path: str | Path, *, device="cpu", dtype=None, allow_pickle: bool = False,
                  config: str | Path | Mapping | None = None, prediction_type: str | None = None,
                  ema: bool = True) -> ModelParts:
    """Load an original single-file checkpoint.

    The architecture comes from, in order: `config` (an original YAML), the config ldm stores in the files it
    writes, a `<name>.yaml` beside the file, or the tensor shapes (`ldm.io.infer`). EMA U-Net weights are preferred, as
    CompVis' sampling scripts use them; `ema=False` takes the non-EMA ones, as diffusers' `from_single_file`
    (`extract_ema=False`, its default) and A1111 do.
    """
    path = Path(path)
    raw, global_step = read_weights(path, allow_pickle=allow_pickle)
    normalized = normalize_text_keys(raw)
    if ema:
        sd, used_ema = select_ema(normalized)
    else:
        sd, used_ema = {k: v for k, v in normalized.items() if not k.startswith("model_ema.")}, False
    notes = []
    if any(k.startswith("model_ema.") for k in raw):
        notes.append("EMA weights found and used for the U-Net" if used_ema
                     else "EMA weights found but not used (--no-ema); using the non-EMA U-Net weights" if not ema
                     else "EMA weights found but incomplete; using the non-EMA U-Net weights")
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        what = what_else(sd)
        raise CheckpointError(f"{path}: no `model.diffusion_model.*` keys; not an original Stable Diffusion single-file "
                              "checkpoint" + (f": {what}" if what else " (a diffusers folder or a native folder is "
                                                                       "loaded by its path)")
                              + f"; the first keys it could not place: {list(sd)[:5]}")
    if (partial := missing_networks(sd)) and not is_sdxl_original(sd):
        raise CheckpointError(f"{path}: {partial}")
    if config is not None:
        _check_family(path, sd, config)
    if is_sdxl_original(sd):  # sgm's layout: text encoders under conditioner.embedders.*
        return load_sdxl_original(path, sd, notes, device=device, dtype=dtype, config=config,
                                  prediction_type=prediction_type)
    ignored = [k for k in sd if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX))]
    if ignored:
        notes.append(f"ignored {len(ignored)} key(s) outside the three networks, e.g. {ignored[0]} "
                     "(training-time buffers such as the noise schedule)")
    header = read_safetensors_metadata(path)
    metadata = header.get(METADATA_KEY)
    beside = path.with_suffix(".yaml")
    if config is None and metadata is None and beside.is_file():
        config = beside  # the convention of SD web UIs: `model.yaml` next to `model.safetensors`
    try:
        if config is not None:
            where = str(config) if not isinstance(config, Mapping) else "original config"
            original = load_yaml(config) if not isinstance(config, Mapping) else config
            sections = sections_from_original_config(original, where=where, prediction_type=prediction_type)
            dims = infer_text_encoder(sd)
            if dims["type"] != sections["text_encoder"]["type"]:
                raise ConfigError(f"{where}: cond_stage_config is {sections['text_encoder']['type']} but {path} holds "
                                  f"{dims['type']} text-encoder weights")
            text = text_config_from_dims(dims, layer=sections["text_encoder"]["layer"],
                                         max_length=sections["text_encoder"].get("max_length"))
            notes.append(f"architecture from {where}; text-encoder sizes read from the weights")
            built = {"unet": unet_config(sections["unet"]), "autoencoder": autoencoder_config(sections["autoencoder"]),
                     "text_encoder": text, "scheduler": ScheduleConfig.from_diffusers(sections["scheduler"])}
            upscale = section_from_original(original["model"]["params"], where)
        elif metadata is not None:
            resolved = json.loads(metadata)
            notes.append(f"architecture from the config stored in {path.name} by ldm")
            built = {"unet": unet_config(resolved["unet"]), "autoencoder": autoencoder_config(resolved["autoencoder"]),
                     "text_encoder": text_config(resolved["text_encoder"]),
                     "scheduler": ScheduleConfig.from_diffusers(resolved["scheduler"])}
            upscale = resolved.get(LATENT_UPSCALE_SECTION)
        else:
            def decide(unet: dict) -> tuple[str, str]:  # SD-2-base (eps) or 768-v: the header, the step, the U-Net
                return sd2_prediction(header, global_step, lambda: _probe(sd, unet, path))

            original, inferred = infer_original_config(sd, prediction_type=prediction_type, sd2_prediction=decide)
            notes += inferred
            sections = sections_from_original_config(original)
            built = {"unet": unet_config(sections["unet"]), "autoencoder": autoencoder_config(sections["autoencoder"]),
                     "text_encoder": text_config_from_dims(infer_text_encoder(sd)),
                     "scheduler": ScheduleConfig.from_diffusers(sections["scheduler"])}
            upscale = section_from_original(original["model"]["params"], "the inferred config")
    except (ConfigError, CheckpointError) as e:
        raise type(e)(f"{path}: {e}") from e
    except (KeyError, IndexError) as e:  # a weight the shape reading relies on is absent
        raise CheckpointError(f"{path}: cannot read the architecture from the weights (no {e}); the file is "
                              "incomplete or not Stable Diffusion; pass an original YAML with --config") from e
    kind = built["text_encoder"].type
    vae = strip_prefix(sd, VAE_PREFIX)
    loss = [k for k in vae if k.startswith("loss.")]
    if loss:  # the autoencoder's training loss (LPIPS, discriminator) sometimes ships inside the checkpoint
        notes.append(f"ignored {len(loss)} autoencoder training-loss weights (first_stage_model.loss.*)")
        vae = {k: v for k, v in vae.items() if not k.startswith("loss.")}
    weights = {"unet": strip_prefix(sd, UNET_PREFIX), "autoencoder": vae,
               "text_encoder": _text_weights(sd, kind, notes)}
    sources = {"unet": f"{path} (U-Net, {UNET_PREFIX}*)", "autoencoder": f"{path} (autoencoder, {VAE_PREFIX}*)",
               "text_encoder": f"{path} (text encoder, {CLIP_PREFIX if kind == 'clip' else OPENCLIP_PREFIX}*)"}
    parts = make_parts(built, weights, source=str(path), sources=sources, device=device, dtype=dtype,
                       prediction_type=prediction_type, notes=notes)
    if upscale is not None:  # the SD x4 upscaler: the low-res image's noise schedule
        parts.config[LATENT_UPSCALE_SECTION] = upscale
    return parts


def _probe(sd: Mapping[str, torch.Tensor], unet: Mapping, path: Path) -> float:
    """`noise_slope` of the file's U-Net (inferred config `unet`), built for it on the CPU in float32 and dropped."""
    network = build_module(unet_config(unet), strip_prefix(sd, UNET_PREFIX), source=f"{path} (U-Net)", device="cpu",
                           dtype=torch.float32).eval()
    return noise_slope(network, in_channels=unet["in_channels"], context_dim=unet["context_dim"],
                       timestep=ScheduleConfig().num_train_timesteps - 1, factor=2 ** (len(unet["channel_mult"]) - 1))


def original_config(components: ModelParts) -> dict:
    """The components' architecture in the original CompVis YAML layout."""
    check_can_hold(components, "the original single-file format")
    if components.schedule.is_edm:
        raise LdmError("the original single-file format cannot hold an EDM model: CompVis configs know the discrete "
                       "eps / v / x0 parameterisations only; save it with --to native or --to diffusers")
    text = components.config["text_encoder"]
    config = original_config_from_sections(components.config["unet"], components.config["autoencoder"], text["type"],
                                           text["layer"] or "last", components.config["scheduler"])
    upscale = components.config.get(LATENT_UPSCALE_SECTION)
    return add_to_original(config, upscale) if upscale is not None else config


def original_state_dict(components: ModelParts) -> dict[str, torch.Tensor]:
    """All weights under their original prefixes."""
    sd = {UNET_PREFIX + k: v for k, v in components.unet.state_dict().items()}
    sd.update({VAE_PREFIX + k: v for k, v in components.autoencoder.state_dict().items()})
    sd.update({TEXT_PREFIX + k: v for k, v in components.text_encoder.state_dict().items()})
    return sd


def save_original(components: ModelParts, path: str | Path, *, write_yaml: bool = True) -> None:
    """Write one `.safetensors` with the original key prefixes (+ `<name>.yaml`, the original config, beside it)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LdmError(f"{path}: the original single-file export is written as .safetensors; "
                       "name the file *.safetensors")
    if is_sdxl(components):
        return save_sdxl_original(components, path, write_yaml=write_yaml)
    config = original_config(components)  # fails before anything is written
    metadata = {"format": "pt", METADATA_KEY: json.dumps(to_plain(components.config))}
    write_safetensors(original_state_dict(components), path, metadata=metadata)
    if write_yaml:
        save_yaml(config, path.with_suffix(".yaml"))
