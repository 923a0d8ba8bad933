"""A separately published VAE in place of a model's own (e.g. a fixed-fp16 SDXL VAE): a diffusers `vae/` folder, or
one `.safetensors` with diffusers or CompVis keys (optionally under `first_stage_model.`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ldm.errors import CheckpointError
from ldm.io.checkpoint import load_into, read_state_dict
from ldm.io.keys_vae import vae_config_from_diffusers, vae_diffusers_to_original
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.textfiles import read_text


def load_vae(path: str | Path, like: AutoencoderConfig, *, allow_pickle: bool = False) -> tuple[AutoencoderKL, str]:
    """(autoencoder, note) from `path`; a file without its own config takes `like` (the model's VAE config) with
    `force_upcast` off: a VAE given on its own is taken to be one that works in the sampling precision."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"--vae {path}: a folder must be a diffusers VAE folder (config.json + "
                                  "diffusion_pytorch_model.safetensors)")
        raw = json.loads(read_text(config_file, "VAE config"))
        config = dataclasses.replace(vae_config_from_diffusers(raw), force_upcast=bool(raw.get("force_upcast", True)))
        weights = [p for p in (path / "diffusion_pytorch_model.safetensors", path / "diffusion_pytorch_model.bin")
                   if p.is_file()]
        if not weights:
            raise CheckpointError(f"--vae {path}: no diffusion_pytorch_model.safetensors in the folder")
        sd = vae_diffusers_to_original(read_state_dict(weights[0], allow_pickle=allow_pickle), config)
        source, note = str(weights[0]), f"VAE from {path} (force_upcast={config.force_upcast})"
    elif path.is_file():
        sd = read_state_dict(path, allow_pickle=allow_pickle)
        sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items()
              if k.startswith("first_stage_model.") or not any(k.startswith("first_stage_model.") for k in sd)}
        config = dataclasses.replace(like, force_upcast=False)
        if any(".down_blocks." in k or ".up_blocks." in k for k in sd):
            sd = vae_diffusers_to_original(sd, config)
        source, note = str(path), f"VAE from {path}, with the model's VAE config; decoded in the sampling precision"
    else:
        raise CheckpointError(f"--vae {path}: not found")
    vae = AutoencoderKL(config)
    load_into(vae, sd, source=source)
    return vae.eval(), note
