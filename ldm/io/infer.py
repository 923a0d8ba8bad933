"""Architecture of an original single-file SD checkpoint: read from the tensor shapes, or from an original YAML.

Both paths meet in the original CompVis config layout (`model.params.unet_config.params`, `first_stage_config`,
`cond_stage_config`, `scale_factor`, `linear_start`/`linear_end`, `parameterization`), which
`sections_from_original_config` turns into plain per-component dicts. Text-encoder sizes never appear in that
layout (it names a pretrained model), so they are always read from the weights (`infer_text_encoder`).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ldm.diffusion.schedules import PREDICTION_ALIASES, ScheduleConfig
from ldm.errors import CheckpointError, ConfigError
from ldm.io.latent_upscale_format import X4_DIFFUSION, X4_HEADS, add_to_original
from ldm.models.autoencoder import AutoencoderConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD-1: HF CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD-2: open_clip text tower
EMA_PREFIX = "model_ema."

CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
HEAD_WIDTH = 64  # CLIP ViT-L/14 text (768 = 12 x 64), OpenCLIP ViT-H/14 text (1024 = 16 x 64), SD-2 U-Net heads

_PREDICTION = PREDICTION_ALIASES  # CompVis' `parameterization` names are the short ones
# Stable Diffusion's numbers, from their one home (the config dataclasses' defaults).
_SD_SCHEDULE = ScheduleConfig()
_SD_SCALE = AutoencoderConfig.scale_factor
_BETAS = {"linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "sqrt_linear": "linear"}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def is_original_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for a CompVis/Stability single-file state dict (U-Net under `model.diffusion_model.`)."""
    return any(k.startswith(UNET_PREFIX) for k in sd)


def what_else(sd: Mapping[str, torch.Tensor]) -> str | None:
    """What a weights file without a U-Net is, and the way out, for the files users mistake for a model: a LoRA, a
    VAE alone, a textual-inversion embedding, one diffusers component. None when it is none of them."""
    keys = list(sd)
    if any("lora_" in k or ".lora." in k or k.startswith(("lora_unet_", "lora_te")) or ".alpha" == k[-6:]
           for k in keys):
        return ("it is a LoRA (low-rank adapter weights such as lora_down/lora_up or lora_A/lora_B), not a model: "
                "ldm does not apply LoRAs; pass the whole Stable Diffusion checkpoint (or a model with the LoRA merged in)")
    inner = [k.removeprefix(VAE_PREFIX) for k in keys]
    if inner and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in inner):
        return ("it holds an autoencoder (VAE) alone, not a whole model: give it beside the model it belongs to, "
                "ldm-txt2img --model MODEL --vae FILE")
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param.")
           for k in keys):
        return ("it is a textual-inversion embedding, not a model: pass the whole Stable Diffusion checkpoint")
    if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.", "text_model.", "encoder.block.")) for k in keys):
        return ("it is one component of a diffusers folder (its keys are diffusers' down_blocks / text_model ...): "
                "pass the pipeline folder that holds it (model_index.json, unet/, vae/, text_encoder/ ...)")
    return None


def missing_networks(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Which of the three networks a file with a U-Net lacks (a U-Net-only export, a pruned file), or None."""
    missing = [(name, prefix) for name, prefix in (("autoencoder", VAE_PREFIX), ("text encoder", TEXT_PREFIX))
               if not any(k.startswith(prefix) for k in sd)]
    if not missing:
        return None
    return (f"it holds the U-Net (model.diffusion_model.*) without the "
            f"{' and the '.join(f'{name} ({prefix}*)' for name, prefix in missing)}: a single-file checkpoint holds "
            "the whole model; pass the full checkpoint, or a diffusers folder")


def select_ema(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Replace U-Net weights by their EMA copies when every one is present; return (state dict, used_ema).

    CompVis' LitEma stores `model.diffusion_model.a.b.weight` as `model_ema.diffusion_modela.bweight`
    (the name after `model.` with its dots removed), plus `model_ema.decay` and `model_ema.num_updates`.
    """
    out = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    unet_keys = [k for k in out if k.startswith(UNET_PREFIX)]
    flat = {k: EMA_PREFIX + k[len("model."):].replace(".", "") for k in unet_keys}
    if not unet_keys or not all(f in sd for f in flat.values()):
        return out, False
    for key, ema_key in flat.items():
        out[key] = sd[ema_key]
    return out, True


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _uniform(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


def infer_unet(sd: Mapping[str, torch.Tensor]) -> dict:
    """CompVis `unet_config.params` read from the shapes of the `model.diffusion_model.*` weights."""
    u = strip_prefix(sd, UNET_PREFIX)
    if "input_blocks.0.0.weight" not in u:
        raise CheckpointError("no U-Net weights (model.diffusion_model.input_blocks.0.0.weight) in the checkpoint")
    model_channels, in_channels = u["input_blocks.0.0.weight"].shape[:2]
    levels: list[dict] = [{"res": 0, "mult": None, "attn": False, "depth": 0}]
    conv_resample = True
    for i in range(1, max(_indices(u, r"input_blocks\.(\d+)\."), default=0) + 1):
        if f"input_blocks.{i}.0.in_layers.0.weight" not in u:  # a Downsample (weightless when conv_resample=False)
            conv_resample = f"input_blocks.{i}.0.op.weight" in u
            levels.append({"res": 0, "mult": None, "attn": False, "depth": 0})
            continue
        level = levels[-1]
        level["res"] += 1
        width = u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]
        level["mult"] = level["mult"] or width // model_channels
        depth = len(_indices(u, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        if depth:
            level["attn"], level["depth"] = True, depth
            level["cross_only"] = _attn1_reads_text(u, f"input_blocks.{i}.1")
    if max(_indices(u, r"input_blocks\.(\d+)\."), default=0) + 1 > len(_indices(u, r"input_blocks\.(\d+)\.")):
        conv_resample = False
    if any(lv["mult"] is None for lv in levels):
        raise CheckpointError("U-Net weights: a resolution level without ResBlocks; not a CompVis U-Net layout")
    mid_depth = len(_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    # A level without attention has no depth of its own: the common depth when there is one, else 1 (sgm's SDXL
    # yaml: [1, 2, 10]); the last level's is the middle block's.
    common = {lv["depth"] for lv in levels if lv["attn"]} | {mid_depth}
    fill = mid_depth if len(common) == 1 else 1
    depths = [lv["depth"] or (mid_depth if i == len(levels) - 1 else fill) for i, lv in enumerate(levels)]
    proj_in = next((v for k, v in u.items() if k.endswith(".1.proj_in.weight")), None)
    to_k = next((v for k, v in u.items() if k.endswith("attn2.to_k.weight")), None)
    linear = proj_in is not None and proj_in.ndim == 2
    params = {
        "in_channels": int(in_channels),
        "out_channels": int(u["out.2.weight"].shape[0]),
        "model_channels": int(model_channels),
        "attention_resolutions": [2 ** i for i in reversed(range(len(levels))) if levels[i]["attn"]],
        "num_res_blocks": _uniform([lv["res"] for lv in levels]),
        "channel_mult": [lv["mult"] for lv in levels],
        "transformer_depth": _uniform(depths),
        "context_dim": int(to_k.shape[1]) if to_k is not None else None,
        "use_linear_in_transformer": linear,
        "use_spatial_transformer": True,
        "legacy": False,
    }
    if not conv_resample:
        params["conv_resample"] = False
    # attn1 reading the text (keys of the context's width) instead of the pixels: the SD x4 upscaler
    if any(lv.get("cross_only") for lv in levels):
        params["disable_self_attentions"] = [bool(lv.get("cross_only")) for lv in levels]
    if _attn1_reads_text(u, "middle_block.1"):
        params["disable_middle_self_attn"] = True
    # Head counts leave no trace in the shapes: use SD's conventions (SD-1: 8 heads; SD-2: 64-channel heads).
    if linear:
        params["num_head_channels"] = min(HEAD_WIDTH, int(model_channels))
    else:
        params["num_heads"] = 8
    if "label_emb.0.0.weight" in u:
        params["num_classes"], params["adm_in_channels"] = "sequential", int(u["label_emb.0.0.weight"].shape[1])
    elif "label_emb.weight" in u:
        params["num_classes"] = int(u["label_emb.weight"].shape[0])
    return params


def _attn1_reads_text(u: Mapping[str, torch.Tensor], transformer: str) -> bool:
    """Whether a SpatialTransformer's attn1 takes keys from the text (CompVis disable_self_attn): its to_k reads a
    width other than the transformer's own. Where the text is as wide as the transformer the shapes cannot tell,
    and self-attention (the usual case, and the x4 upscaler's deepest level) is assumed."""
    to_k, proj_in = u.get(f"{transformer}.transformer_blocks.0.attn1.to_k.weight"), u.get(f"{transformer}.proj_in.weight")
    return to_k is not None and proj_in is not None and to_k.shape[1] != proj_in.shape[0]


def looks_like_latent_upscaler(unet: Mapping, autoencoder: Mapping) -> bool:
    """The SD x4 upscaler's signature in inferred configs: 3 low-res RGB channels beside the latent, a class label
    (the noise level), and an f=4 autoencoder."""
    return (unet["in_channels"] == unet["out_channels"] + 3 and isinstance(unet.get("num_classes"), int)
            and len(autoencoder["ddconfig"]["ch_mult"]) == 3)


def infer_autoencoder(sd: Mapping[str, torch.Tensor]) -> dict:
    """CompVis `first_stage_config.params` (`embed_dim` + `ddconfig`) read from the `first_stage_model.*` shapes."""
    v = strip_prefix(sd, VAE_PREFIX)
    if "encoder.conv_in.weight" not in v:
        raise CheckpointError("no autoencoder weights (first_stage_model.encoder.conv_in.weight) in the checkpoint")
    ch, in_channels = v["encoder.conv_in.weight"].shape[:2]
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    ch_mult = [int(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in levels]
    z_channels = int(v["decoder.conv_in.weight"].shape[1])
    resolution = 256  # not stored in the weights; only used for where attention sits
    attn = [resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in v]
    return {
        "embed_dim": int(v["post_quant_conv.weight"].shape[1]),
        "ddconfig": {
            "double_z": int(v["encoder.conv_out.weight"].shape[0]) == 2 * z_channels,
            "z_channels": z_channels,
            "resolution": resolution,
            "in_channels": int(in_channels),
            "out_ch": int(v["decoder.conv_out.weight"].shape[0]),
            "ch": int(ch),
            "ch_mult": ch_mult,
            "num_res_blocks": len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
            "attn_resolutions": attn,
            "dropout": 0.0,
        },
    }


def normalize_text_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old SD-1 files store CLIP without `text_model.` (transformers < 4.2x layout): insert it."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(CLIP_PREFIX) for k in sd) or not any(k.startswith(old + "embeddings.") for k in sd):
        return dict(sd)
    return {(CLIP_PREFIX + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


def infer_text_encoder(sd: Mapping[str, torch.Tensor]) -> dict:
    """Kind and sizes of the text encoder under `cond_stage_model.*`: {type, width, layers, heads, ...}."""
    c = strip_prefix(sd, CLIP_PREFIX)
    if "embeddings.token_embedding.weight" in c:
        vocab, width = c["embeddings.token_embedding.weight"].shape
        return {
            "type": "clip", "layer": "last", "vocab_size": int(vocab), "width": int(width),
            "layers": len(_indices(c, r"encoder\.layers\.(\d+)\.")),
            "heads": max(1, int(width) // HEAD_WIDTH),
            "intermediate_size": int(c["encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "context_length": int(c["embeddings.position_embedding.weight"].shape[0]),
        }
    o = strip_prefix(sd, OPENCLIP_PREFIX)
    if "token_embedding.weight" in o:
        vocab, width = o["token_embedding.weight"].shape
        proj = o.get("text_projection")
        return {
            "type": "openclip", "layer": "penultimate", "vocab_size": int(vocab), "width": int(width),
            "layers": len(_indices(o, r"transformer\.resblocks\.(\d+)\.")),
            "heads": max(1, int(width) // HEAD_WIDTH),
            "intermediate_size": int(o["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "context_length": int(o["positional_embedding"].shape[0]),
            "embed_dim": int(proj.shape[1]) if proj is not None else int(width),
        }
    raise CheckpointError("no text encoder weights (cond_stage_model.transformer.text_model.* for CLIP or "
                          "cond_stage_model.model.* for OpenCLIP) in the checkpoint")


SD2_V_IMAGE_SIZE = 96  # latent pixels: the SD-2 768-v models' size (diffusers' v2 default, 768 px)


def prediction_note(prediction_type: str, why: str) -> str:
    """The load note for a prediction type ldm chose for the user (`why`: what it was inferred from)."""
    short = {v: k for k, v in _PREDICTION.items()}.get(prediction_type, prediction_type)
    return f"prediction type: {short} (inferred from {why}); override with --prediction-type"


def infer_original_config(sd: Mapping[str, torch.Tensor], *, prediction_type: str | None = None,
                          sd2_prediction=None) -> tuple[dict, list[str]]:
    """An original-layout config for a single-file state dict, and notes on what was assumed.

    `sd2_prediction(unet_params) -> (prediction type, why)` decides a plain SD-2.x text-to-image file's prediction
    type when `prediction_type` is None (`ldm.io.sd2_prediction`); without it eps is assumed, and said.
    """
    unet = infer_unet(sd)
    text = infer_text_encoder(sd)
    autoencoder = infer_autoencoder(sd)
    upscaler = looks_like_latent_upscaler(unet, autoencoder)
    sd2 = text["type"] == "openclip" or unet["use_linear_in_transformer"]
    family = "SD x4 upscaler" if upscaler else "SD-2.x" if sd2 else "SD-1.x"
    sd2_text_to_image = sd2 and not upscaler and unet["in_channels"] == unet["out_channels"]
    if upscaler:  # x4-upscaling.yaml: 8 heads at every level (not SD-2's 64-channel heads)
        unet.pop("num_head_channels", None)
        unet["num_heads"] = X4_HEADS
    notes = [f"architecture inferred from tensor shapes: {family}-style "
             f"(model_channels={unet['model_channels']}, channel_mult={unet['channel_mult']}, "
             f"context_dim={unet['context_dim']}, in_channels={unet['in_channels']}"
             + (", inpainting" if unet["in_channels"] == 9 else "") + ")"]
    heads = (f"num_head_channels={unet['num_head_channels']}" if "num_head_channels" in unet
             else f"num_heads={unet['num_heads']}")
    notes.append(f"attention heads are not stored in the weights; assumed {family}'s {heads}")
    if upscaler:
        notes.append("the x4 upscaler's schedule, latent scale, noise-level schedule and v-prediction are not stored "
                     f"in the weights; assumed x4-upscaling.yaml's ({X4_DIFFUSION})")
    if prediction_type is None and sd2_text_to_image and sd2_prediction is not None:
        prediction_type, why = sd2_prediction(unet)
        notes.append(prediction_note(prediction_type, why))
    if upscaler and prediction_type is None:
        parameterization = "v"
    elif prediction_type is None and sd2 and unet["in_channels"] == 9:
        parameterization = "eps"
        notes.append(prediction_note("epsilon", "the shapes: SD-2 inpainting models are eps (stable-diffusion-2-"
                                                "inpainting; diffusers' rule)"))
    elif prediction_type is None and sd2:
        parameterization = "eps"
        notes.append("prediction type cannot be read from the weights; assumed eps (noise). SD-2 768-v models need "
                     "--prediction-type v_prediction or a config with `parameterization: v`")
    elif prediction_type is None:
        parameterization = "eps"
        notes.append(prediction_note("epsilon", f"the shapes: {family} models are eps"))
    else:
        parameterization = {v: k for k, v in _PREDICTION.items()}.get(prediction_type, prediction_type)
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": _SD_SCHEDULE.beta_start, "linear_end": _SD_SCHEDULE.beta_end,
        "timesteps": _SD_SCHEDULE.num_train_timesteps, "parameterization": parameterization, "scale_factor": _SD_SCALE, "conditioning_key": "crossattn",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": autoencoder},
        "cond_stage_config": {"target": OPENCLIP_TARGET if text["type"] == "openclip" else CLIP_TARGET,
                              "params": {"layer": text["layer"]}},
    }}}
    if sd2_text_to_image and parameterization == "v":  # the 768-v models: sample at 768 px unless told otherwise
        config["model"]["params"]["image_size"] = SD2_V_IMAGE_SIZE
        pixels = SD2_V_IMAGE_SIZE * 2 ** (len(autoencoder["ddconfig"]["ch_mult"]) - 1)
        notes.append(f"default image size {pixels} px (latent {SD2_V_IMAGE_SIZE}), the SD-2 768-v models' "
                     "(diffusers' v2 default); set --height/--width for another")
    if upscaler:
        config["model"]["params"].update(X4_DIFFUSION)
        config = add_to_original(config, {})
    return config, notes


COMPVIS_LAYOUT = "the CompVis layout model.params.{unet_config,first_stage_config,cond_stage_config}"


def config_entry(node: Mapping, path: str, where: str, layout: str = COMPVIS_LAYOUT):
    """The entry at dotted `path` of an original config, or a ConfigError naming `where` and the expected layout."""
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{where}: the original config has no `{path}` (expected {layout})")
        node = node[part]
    return node


def sections_from_original_config(config: Mapping, *, where: str = "original config",
                                  prediction_type: str | None = None) -> dict:
    """Plain per-component dicts from an original-layout config.

    Returns {"unet": unet_config.params, "autoencoder": ddconfig + embed_dim + scale_factor,
    "text_encoder": {"type", "layer"}, "scheduler": diffusers scheduler-config keys}.
    """
    params = config_entry(config, "model.params", where)
    unet = dict(config_entry(params, "unet_config.params", where))
    # The latent size the model was trained at lives in LatentDiffusion's `image_size` (64 for SD-1/2-base, 96 for
    # 768-v); unet_config's own `image_size` is a legacy value the network never reads.
    unet["sample_size"] = int(params["image_size"]) if "image_size" in params else 64
    first = config_entry(params, "first_stage_config.params", where)
    autoencoder = {**config_entry(first, "ddconfig", where), "embed_dim": first.get("embed_dim", 4)}
    autoencoder["scale_factor"] = float(params.get("scale_factor", 1.0))
    if "shift_factor" in params:
        autoencoder["shift_factor"] = float(params["shift_factor"])
    cond = params.get("cond_stage_config") or {}
    target = str(cond.get("target", "")) if isinstance(cond, Mapping) else str(cond)
    cond_params = (cond.get("params") or {}) if isinstance(cond, Mapping) else {}
    if "OpenCLIP" in target:
        text = {"type": "openclip", "layer": cond_params.get("layer", "penultimate")}
    elif "CLIP" in target:
        text = {"type": "clip", "layer": cond_params.get("layer", "last")}
    else:
        raise ConfigError(f"{where}: cond_stage_config.target {target!r} is not a CLIP/OpenCLIP text encoder")
    if "max_length" in cond_params:
        text["max_length"] = int(cond_params["max_length"])
    parameterization = params.get("parameterization", "eps")
    if parameterization not in _PREDICTION:
        raise ConfigError(f"{where}: parameterization {parameterization!r} is not one of {list(_PREDICTION)}")
    schedule = params.get("beta_schedule", "linear")
    if schedule not in _BETAS:
        raise ConfigError(f"{where}: beta_schedule {schedule!r} is not one of {list(_BETAS)}")
    scheduler = {
        "num_train_timesteps": int(params.get("timesteps", _SD_SCHEDULE.num_train_timesteps)),
        "beta_start": float(params.get("linear_start", _SD_SCHEDULE.beta_start)),
        "beta_end": float(params.get("linear_end", _SD_SCHEDULE.beta_end)),
        "beta_schedule": _BETAS[schedule],
        "prediction_type": prediction_type or _PREDICTION[parameterization],
        # CompVis' DDIM sampler steps through t = 1, 1 + c, 1 + 2c, ... and uses alpha_bar_0 as the final alpha:
        # diffusers' steps_offset=1, set_alpha_to_one=False (what diffusers' own SD configs say).
        "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
    }
    return {"unet": unet, "autoencoder": autoencoder, "text_encoder": text, "scheduler": scheduler}


def original_config_from_sections(unet: Mapping, autoencoder: Mapping, text_type: str, text_layer: str,
                                  scheduler: Mapping) -> dict:
    """The inverse: an original-layout config (what diffusers' `from_single_file(original_config=...)` reads)."""
    unet = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.items() if v is not None}
    for key, default in (("num_heads", -1), ("num_head_channels", -1)):
        if unet.get(key) == default:
            unet.pop(key)  # diffusers reads any present `num_heads` as the head count
    if unet.get("adm_in_channels") is not None:
        unet["num_classes"] = "sequential"  # CompVis' spelling of a pooled-vector embedding
    sample_size = unet.pop("sample_size", None) or 64
    if unet.pop("learn_sigma", False):
        unet["out_channels"] = 2 * unet["out_channels"]  # CompVis has no flag: the variance is extra channels
    ae = {k: (list(v) if isinstance(v, tuple) else v) for k, v in autoencoder.items()}
    scale, shift, embed_dim = ae.pop("scale_factor", _SD_SCALE), ae.pop("shift_factor", 0.0), ae.pop("embed_dim", 4)
    ae.pop("norm_groups", None)
    ae.pop("force_upcast", None)  # a sampling precision choice, not CompVis architecture
    params = {
        "linear_start": scheduler.get("beta_start", _SD_SCHEDULE.beta_start),
        "linear_end": scheduler.get("beta_end", _SD_SCHEDULE.beta_end),
        "timesteps": scheduler.get("num_train_timesteps", _SD_SCHEDULE.num_train_timesteps),
        "beta_schedule": {**{v: k for k, v in _BETAS.items()}, "cosine": "cosine"}[scheduler.get("beta_schedule",
                                                                                                "scaled_linear")],
        "parameterization": {v: k for k, v in _PREDICTION.items()}[scheduler.get("prediction_type", "epsilon")],
        "scale_factor": scale, "conditioning_key": "crossattn", "image_size": sample_size,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": embed_dim, "ddconfig": ae}},
        "cond_stage_config": {"target": OPENCLIP_TARGET if text_type == "openclip" else CLIP_TARGET,
                              "params": {"layer": text_layer}},
    }
    if shift:
        params["shift_factor"] = shift
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
