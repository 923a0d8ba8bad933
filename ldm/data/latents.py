"""Precomputed latent shards: the record layout, the caption-deduplicated text store, the "latent" sample format.

A latent shard set is a folder written by `data_scripts/precompute_latents.py`:
- `NNNNN.tar`: per sample `KEY.latent.safetensors` (posterior `mean`, `std`, `c h w` float16, unscaled; for a
  pixel-space model, made without an autoencoder, `mean` is the image in [-1, 1] and there is no `std`), `KEY.txt`
  (the caption) and `KEY.json` (the source json plus `latent`: image size, caption hash, text file).
- `text-NNNNN.safetensors`: each unique caption's embedding once, keyed by the caption's sha1:
  `<sha1>.tokens` (`n d` float16), `<sha1>.mask` (`n` bool), `<sha1>.pooled` (`d` float16, when the encoder has one).
- `latents_meta.json`: which autoencoder and text encoder made them (weights sha1), scale factor, sizes, counts.
  It is written last: a folder without it is incomplete, and training refuses it.

The training-time latent is a fresh posterior draw, `(mean + std * eps - shift_factor) * scale_factor`, exactly
what encoding the image would have given. Importing this module registers the "latent" sample format.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm.atomic import atomic_write_bytes, atomic_write_text
from ldm.data.loader import REMOTE_PREFIXES, expand_shards
from ldm.data.samples import SkipSample, FilteredSample, image_sample, read_caption, read_meta, register_sample_format
from ldm.errors import ConfigError, LdmError

if TYPE_CHECKING:
    from torch import nn

    from ldm.data.config import DataConfig

LATENTS_META = "latents_meta.json"
FORMAT_NAME, FORMAT_VERSION = "ldm-latent-shards", 1
LATENT_MEMBER = "latent.safetensors"  # tar member suffix: KEY.latent.safetensors
STORE_DTYPE = torch.float16


def caption_hash(caption: str) -> str:
    """sha1 of the caption's UTF-8 bytes: the key of its stored text embedding."""
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


def module_sha1(module: "nn.Module") -> str:
    """sha1 over a module's state dict (names, shapes, float weights as float32): the same weights, the same hash."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_identity(autoencoder: "nn.Module | None", text_encoder: "nn.Module") -> dict[str, dict[str, Any]]:
    """What must match between precomputing and training: classes, text settings and the weights' sha1 (no
    autoencoder: a pixel-space model, whose shards hold the images themselves)."""
    if not getattr(text_encoder, "frozen", True):
        raise LdmError(f"the text encoder ({type(text_encoder).__name__}) is trained with the U-Net (its "
                       "TextEncoderConfig.freeze is false, the default of the small encoder): its embeddings change "
                       "every step, so they cannot be precomputed. Use a frozen encoder (CLIP, OpenCLIP, T5, or "
                       "text_encoder.freeze=true), or train from images (loss.inputs=images)")
    pixels = {"class": "none", "latent_channels": 3, "downsample_factor": 1, "sha1": None}  # a pixel model
    return {
        "autoencoder": pixels if autoencoder is None else {
            "class": type(autoencoder).__name__, "latent_channels": autoencoder.latent_channels,
            "downsample_factor": autoencoder.downsample_factor, "sha1": module_sha1(autoencoder)},
        "text_encoder": {"class": type(text_encoder).__name__, "layer": getattr(text_encoder, "layer", "last"),
                         "max_length": text_encoder.max_length, "dim": text_encoder.dim,
                         "sha1": module_sha1(text_encoder)},
    }


def latent_record(key: str, caption: str, meta: dict, mean: torch.Tensor, std: torch.Tensor | None,
                  image_size: tuple[int, int], text_sha1: str, text_file: str,
                  micro: torch.Tensor | None = None) -> dict[str, Any]:
    """One latent sample for AtomicShardWriter: float16 `c h w` posterior mean/std, caption, json with references.

    A pixel-space model's sample holds the image as `mean` and no `std` (float16 keeps 8-bit images exact)."""
    tensors = {"mean": mean, **({"std": std} if std is not None else {})}
    blob = save_safetensors({k: v.detach().to("cpu", STORE_DTYPE).contiguous() for k, v in tensors.items()})
    info = {"image_size": list(image_size), "text_sha1": text_sha1, "text_file": text_file}
    if micro is not None:  # SDXL's size numbers of the encoded crop (ldm.data.samples.size_conditioning)
        info["micro"] = [float(v) for v in micro]
    return {"__key__": key, LATENT_MEMBER: blob, "txt": caption.encode("utf-8"),
            "json": json.dumps({**meta, "latent": info}, sort_keys=True).encode("utf-8")}


class TextEmbeddingStore:
    """Writes each unique caption's embedding once into `text-NNNNN.safetensors` files of up to `per_file` captions."""

    def __init__(self, out_dir: str | os.PathLike, per_file: int = 4096):
        if per_file < 1:
            raise ConfigError(f"captions per text file must be >= 1, got {per_file}")
        self.out_dir, self.per_file = Path(out_dir), per_file
        self.files: list[str] = []
        self.where: dict[str, str] = {}  # caption sha1 -> text file holding it
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_count = 0

    def __contains__(self, sha1: str) -> bool:
        return sha1 in self.where

    def __len__(self) -> int:
        return len(self.where)

    def add(self, sha1: str, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> str:
        """Store one caption's `n d` tokens, `n` mask and `d` pooled (or None); returns the file name holding it."""
        if sha1 in self.where:
            return self.where[sha1]
        name = f"text-{len(self.files):05d}.safetensors"
        self._pending[f"{sha1}.tokens"] = tokens.detach().to("cpu", STORE_DTYPE).contiguous()
        self._pending[f"{sha1}.mask"] = mask.detach().to("cpu", torch.bool).contiguous()
        if pooled is not None:
            self._pending[f"{sha1}.pooled"] = pooled.detach().to("cpu", STORE_DTYPE).contiguous()
        self.where[sha1] = name
        self._pending_count += 1
        if self._pending_count >= self.per_file:
            self.flush()
        return name

    def flush(self) -> None:
        """Write the pending captions' file (atomically)."""
        if not self._pending:
            return
        name = f"text-{len(self.files):05d}.safetensors"
        atomic_write_bytes(self.out_dir / name, save_safetensors(self._pending))
        self.files.append(name)
        self._pending, self._pending_count = {}, 0


# ----------------------------------------------------------------------------------------------- reading

_OPEN_TEXT_FILES: dict[tuple[str, int, int], Any] = {}  # per process: (path, mtime, size) -> safe_open handle


def read_text_embedding(path: str | os.PathLike, sha1: str) -> dict[str, torch.Tensor]:
    """`{"text_tokens", "text_mask"[, "text_pooled"]}` of caption hash `sha1` in text file `path`."""
    path = str(path)
    try:
        stat = os.stat(path)
        cache_key = (path, stat.st_mtime_ns, stat.st_size)
        handle = _OPEN_TEXT_FILES.get(cache_key)
        if handle is None:
            handle = _OPEN_TEXT_FILES[cache_key] = safe_open(path, framework="pt")
        names = set(handle.keys())
    except (OSError, RuntimeError, ValueError) as e:  # missing or unreadable sidecar: the whole set is broken
        raise LdmError(f"cannot read text embeddings {path}: {e}; the latent shard folder is incomplete, "
                       "run data_scripts/precompute_latents.py again") from e
    if f"{sha1}.tokens" not in names:
        raise SkipSample("no_text_embedding", f"{sha1} not in {path}")
    fields = {"text_tokens": handle.get_tensor(f"{sha1}.tokens"), "text_mask": handle.get_tensor(f"{sha1}.mask")}
    if f"{sha1}.pooled" in names:
        fields["text_pooled"] = handle.get_tensor(f"{sha1}.pooled")
    return fields


def _local_folder(url: str) -> Path:
    """The folder of a local shard URL; latent shards need random access to their text files, so nothing remote."""
    if url.startswith(REMOTE_PREFIXES):
        raise LdmError(f"latent shard {url} is not a local file: latent shards resolve their text embeddings from "
                       "text-NNNNN.safetensors beside them, which needs local (or mounted) files")
    return Path(url.removeprefix("file:")).expanduser().parent


def latent_sample(raw: dict, config: "DataConfig", rng: random.Random) -> tuple[int, dict]:
    """The "latent" format: posterior mean/std `c h w` and the caption's text embedding -> float16 tensors."""
    caption = read_caption(raw, config.caption_key)
    meta = read_meta(raw)
    info, blob = meta.get("latent"), raw.get(LATENT_MEMBER)
    if not isinstance(info, dict) or blob is None:
        raise SkipSample("no_latent")
    if (reason := config.sample_filter.reject_reason(meta)) is not None:
        raise FilteredSample(reason)
    try:
        latent = load_safetensors(bytes(blob))
    except Exception as e:  # a truncated or garbled member: skipped and counted like a corrupt image
        raise SkipSample("corrupt_latent", str(e)) from e
    size = tuple(info["image_size"])
    sizes = config.sizes
    if size not in sizes:
        raise LdmError(f"latent sample {raw['__key__']} was encoded from a {size[0]}x{size[1]} image, which is not "
                       f"among the data sizes {sizes}; set data.resolution / data.buckets as at precompute time")
    text = read_text_embedding(_local_folder(raw["__url__"]) / info["text_file"], info["text_sha1"])
    fields = {"latent_mean": latent["mean"], **text, "caption": caption, "key": raw["__key__"]}
    if "std" in latent:  # absent in a pixel model's shards (the mean is the image)
        fields["latent_std"] = latent["std"]
    if "micro" in info:
        fields["micro"] = torch.tensor(info["micro"], dtype=torch.float32)
    return sizes.index(size), fields


def image_sample_with_meta(raw: dict, config: "DataConfig", rng: random.Random) -> tuple[int, dict]:
    """The "image" format plus the parsed json as `meta` (what precompute_latents.py reads to keep it)."""
    bucket, fields = image_sample(raw, config, rng)
    return bucket, {**fields, "meta": read_meta(raw)}


register_sample_format("latent", latent_sample)
register_sample_format("image_with_meta", image_sample_with_meta)


# ------------------------------------------------------------------------------------------ metadata check

def write_latents_meta(out_dir: str | os.PathLike, meta: dict) -> Path:
    """Write `latents_meta.json` (last, atomically: its presence marks a complete shard set)."""
    path = Path(out_dir) / LATENTS_META
    atomic_write_text(path, json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta}, indent=2,
                                       sort_keys=True) + "\n")
    return path


def read_latents_meta(folder: str | os.PathLike) -> dict:
    """The `latents_meta.json` of a latent shard folder, or an LdmError saying how to make one."""
    path = Path(folder) / LATENTS_META
    if not path.is_file():
        raise LdmError(f"{folder} holds no {LATENTS_META}: it is not a complete latent shard set. Write one with "
                       "data_scripts/precompute_latents.py (an interrupted run leaves none), or train from images "
                       "with data.sample_format=image and loss.inputs=images")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LdmError(f"{path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise LdmError(f"{path} describes format {meta.get('format')!r} v{meta.get('version')}, this ldm reads "
                       f"{FORMAT_NAME!r} v{FORMAT_VERSION}; precompute the latents again")
    return meta


def check_latent_shards(config: "DataConfig", autoencoder: "nn.Module", text_encoder: "nn.Module") -> list[dict]:
    """Refuse latent shards made by another autoencoder or text encoder, or at other sizes; returns their metas."""
    if config.flip_prob > 0:
        raise ConfigError("data.flip_prob > 0 cannot apply to precomputed latents (the image was encoded unflipped); "
                          "set data.flip_prob=0, or train from images")
    identity = encoder_identity(autoencoder, text_encoder)
    folders = sorted({_local_folder(url) for url in expand_shards(config.shards)})
    metas = []
    for folder in folders:
        meta = read_latents_meta(folder)
        made_by = meta.get("encoders", {})
        diffs = [f"{part}.{name}: shards {made_by.get(part, {}).get(name)!r}, model {value!r}"
                 for part, fields in identity.items() for name, value in fields.items()
                 if made_by.get(part, {}).get(name) != value]
        if diffs:
            raise LdmError(f"the latent shards in {folder} were made with other encoders than this model's "
                           f"({'; '.join(diffs)}). They were precomputed with --model {meta.get('model')!r}: train "
                           "with that model's autoencoder and text encoder, or precompute again with yours")
        missing = [tuple(s) for s in meta.get("sizes", []) if tuple(s) not in config.sizes]
        if missing:
            raise LdmError(f"the latent shards in {folder} hold latents of {missing} (h, w) images, not among the "
                           f"data sizes {config.sizes}; set data.resolution / data.buckets to what they were "
                           f"precomputed at")
        ae = getattr(autoencoder, "config", None)
        if ae is not None and (meta.get("scale_factor"), meta.get("shift_factor")) != (ae.scale_factor,
                                                                                       ae.shift_factor):
            warnings.warn(f"{folder}: precomputed with scale_factor={meta.get('scale_factor')}, shift_factor="
                          f"{meta.get('shift_factor')}; training uses the model's {ae.scale_factor}, "
                          f"{ae.shift_factor} (the stored latents are unscaled, so the model's apply)", stacklevel=2)
        if meta.get("crop") not in (None, config.crop):
            warnings.warn(f"{folder}: latents were precomputed with crop={meta.get('crop')!r}; data.crop="
                          f"{config.crop!r} does not apply to them", stacklevel=2)
        metas.append(meta)
    return metas
