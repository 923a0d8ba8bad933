"""Sample filters on img2dataset json metadata (size, aspect ratio, CLIP similarity, watermark/NSFW scores)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# img2dataset copies LAION's parquet columns into the json; the names vary between LAION releases.
SIMILARITY_KEYS = ("similarity", "clip_similarity")
WATERMARK_KEYS = ("pwatermark", "watermark")
PUNSAFE_KEYS = ("punsafe",)
AESTHETIC_KEYS = ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")


def _first_number(meta: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def original_size(meta: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(width, height) before img2dataset resized it: original_* first, then width/height, then the decoded image."""
    for wk, hk in (("original_width", "original_height"), ("width", "height")):
        w, h = _first_number(meta, (wk,)), _first_number(meta, (hk,))
        if w and h:
            return int(w), int(h)
    return image_size


@dataclass(frozen=True)
class SampleFilter:
    """Keep-or-drop rule for one sample; every threshold is off when None and a score absent from the json passes."""

    min_size: int | None = None  # shorter original side, pixels
    max_aspect_ratio: float | None = None  # long side / short side
    min_similarity: float | None = None  # CLIP image-text cosine similarity
    max_watermark: float | None = None  # LAION watermark probability
    max_punsafe: float | None = None  # LAION NSFW probability
    min_aesthetic: float | None = None  # LAION aesthetic predictor score

    def reject_reason(self, meta: Mapping[str, Any] | None, image_size: tuple[int, int] | None = None) -> str | None:
        """Why the sample is dropped ("min_size", "aspect_ratio", ...), or None when it is kept."""
        meta = meta or {}
        size = original_size(meta, image_size)
        if size is not None:
            short, long = min(size), max(size)
            if self.min_size is not None and short < self.min_size:
                return "min_size"
            if self.max_aspect_ratio is not None and (short <= 0 or long / short > self.max_aspect_ratio):
                return "aspect_ratio"
        checks = (
            (self.min_similarity, SIMILARITY_KEYS, "similarity", -1),
            (self.max_watermark, WATERMARK_KEYS, "watermark", 1),
            (self.max_punsafe, PUNSAFE_KEYS, "punsafe", 1),
            (self.min_aesthetic, AESTHETIC_KEYS, "aesthetic", -1),
        )
        for threshold, keys, name, sign in checks:
            if threshold is None:
                continue
            value = _first_number(meta, keys)
            if value is not None and sign * (value - threshold) > 0:
                return name
        return None

    def needs_image_size(self, meta: Mapping[str, Any] | None) -> bool:
        """True when the size rules are on and the json does not say the size (decode first, then check)."""
        return (self.min_size is not None or self.max_aspect_ratio is not None) and original_size(meta or {}) is None

    def __call__(self, meta: Mapping[str, Any] | None, image_size: tuple[int, int] | None = None) -> bool:
        """True when the sample is kept."""
        return self.reject_reason(meta, image_size) is None
