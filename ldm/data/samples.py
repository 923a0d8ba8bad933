"""Raw tar sample -> training sample, per sample format; the extension point for latent shards.

A sample format is a function `(raw, config, rng) -> (bucket_index, fields)`. `raw` is webdataset's dict of tar
members (`__key__`, `jpg`, `txt`, `json`, ... as bytes). `fields` holds `key`, `caption` and tensors; the generic
`collate` stacks tensors, lists strings. Raise `SkipSample` for a corrupt or incomplete sample (counted as skipped)
and `FilteredSample` for one the metadata filters drop (counted as filtered). Latent shards written by
`data_scripts/precompute_latents.py` plug in with `register_sample_format("latent", fn)` returning
`latent_mean`, `latent_std` (`c h w`) and `text_tokens`; the loader itself needs no change.
"""
from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any, Callable

import torch

from ldm.data.buckets import nearest_bucket
from ldm.data.transforms import CorruptImage, decode_image, image_transform_with_crop
from ldm.errors import ConfigError

if TYPE_CHECKING:
    from ldm.data.config import DataConfig

SampleFormatFn = Callable[[dict, "DataConfig", random.Random], tuple[int, dict]]


class SkipSample(Exception):
    """A corrupt or incomplete sample; `reason` names why ("corrupt_image", "no_caption", "no_image", ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class FilteredSample(Exception):
    """A valid sample that the metadata filters reject; `reason` names the rule."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_caption(raw: dict, key: str) -> str:
    """The caption text of a raw sample; SkipSample "no_caption" when missing or empty, "caption_not_utf8" when so."""
    value = raw.get(key)
    if value is None:
        raise SkipSample("no_caption")
    try:
        text = value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
    except UnicodeDecodeError as e:
        raise SkipSample("caption_not_utf8", str(e)) from e
    text = text.strip()
    if not text:
        raise SkipSample("no_caption", "empty")
    return text


def read_meta(raw: dict) -> dict:
    """The parsed `json` member ({} when absent), or SkipSample("bad_json")."""
    value = raw.get("json")
    if value is None:
        return {}
    try:
        meta = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from e
    return meta if isinstance(meta, dict) else {}


def image_sample(raw: dict, config: "DataConfig", rng: random.Random) -> tuple[int, dict]:
    """The "image" format: filter on json, decode, resize/crop/flip into its bucket -> image `3 h w` in [-1, 1]."""
    caption = read_caption(raw, config.caption_key)
    data = next((raw[k] for k in config.image_keys if raw.get(k)), None)
    if data is None:
        raise SkipSample("no_image")
    meta = read_meta(raw)
    rule = config.sample_filter
    if not rule.needs_image_size(meta) and (reason := rule.reject_reason(meta)) is not None:
        raise FilteredSample(reason)  # before decoding: most filtered samples cost no JPEG decode
    try:
        image = decode_image(data, tuple(config.background))
    except CorruptImage as e:
        raise SkipSample("corrupt_image", str(e)) from e
    if rule.needs_image_size(meta) and (reason := rule.reject_reason(meta, image.size)) is not None:
        raise FilteredSample(reason)
    sizes = config.sizes
    bucket = nearest_bucket(image.width, image.height, sizes) if config.buckets else 0
    tensor, (top, left) = image_transform_with_crop(image, sizes[bucket], config.crop, config.flip_prob, rng)
    return bucket, {"image": tensor, "caption": caption, "key": raw["__key__"],
                    "micro": size_conditioning(meta, image.size, (top, left), sizes[bucket])}


def size_conditioning(meta: dict, image_size: tuple[int, int], corner: tuple[int, int],
                      target: tuple[int, int]) -> torch.Tensor:
    """SDXL's size numbers of a sample (Podell et al. 2023, sec. 2.2): original (h, w), crop (top, left), target
    (h, w). The original size is img2dataset's `original_height`/`original_width` (the size before it resized),
    else the stored image's."""
    w, h = image_size
    original = (meta.get("original_height"), meta.get("original_width"))
    if not all(isinstance(v, (int, float)) and v > 0 for v in original):
        original = (h, w)
    return torch.tensor([*original, *corner, *target], dtype=torch.float32)


SAMPLE_FORMATS: dict[str, SampleFormatFn] = {"image": image_sample}


def register_sample_format(name: str, fn: SampleFormatFn) -> None:
    """Make `DataConfig(sample_format=name)` decode raw samples with `fn`."""
    SAMPLE_FORMATS[name] = fn


def get_sample_format(name: str) -> SampleFormatFn:
    """The registered format function, or a ConfigError listing the known ones."""
    if name not in SAMPLE_FORMATS:
        raise ConfigError(
            f"unknown DataConfig.sample_format {name!r}; known: {sorted(SAMPLE_FORMATS)} "
            "(latent shards need the format that data_scripts/precompute_latents.py registers)"
        )
    return SAMPLE_FORMATS[name]


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack tensor fields into `b ...`, turn numbers into a `b` tensor, keep everything else as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch
