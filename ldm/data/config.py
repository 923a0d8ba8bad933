"""DataConfig: everything the streaming loader needs, buildable from YAML with ldm.config.from_dict."""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm.data.filters import SampleFilter
from ldm.errors import ConfigError


@dataclass
class DataConfig:
    """Webdataset streaming: shards, filters, transforms, caption dropout and the per-rank epoch length."""

    shards: str | list[str] = ""  # path, directory, glob, brace pattern, URL or "pipe:cmd"; "::" joins patterns
    batch_size: int = 8  # per rank
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the main process)
    resolution: int = 256  # square output size when `buckets` is None
    crop: str = "center"  # "center" | "random"
    flip_prob: float = 0.0  # horizontal flip probability (off by default: text can say "left"/"right")
    caption_dropout: float = 0.0  # probability of replacing a caption by "" (classifier-free guidance training)
    caption_key: str = "txt"  # tar member suffix holding the caption
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])  # first present wins
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB behind transparent pixels
    min_size: int | None = None  # shorter original side in pixels (json original_width/height, else width/height)
    max_aspect_ratio: float | None = None  # long side / short side
    min_similarity: float | None = None  # json "similarity" (CLIP score) at least this
    max_watermark: float | None = None  # json "pwatermark" at most this
    max_punsafe: float | None = None  # json "punsafe" at most this
    min_aesthetic: float | None = None  # json "aesthetic" at least this
    shuffle_buffer: int = 1000  # samples held per worker for shuffling (<= 1 disables)
    resampled: bool = True  # draw shards with replacement forever (training); False = one pass (eval, preprocessing)
    batches_per_epoch: int = 1000  # batches each rank yields per epoch when resampled (identical on every rank)
    seed: int = 0  # shard sampling, shuffling, crops, flips and caption dropout derive from it
    buckets: list[tuple[int, int]] | None = None  # (h, w) aspect-ratio buckets; None = square `resolution`
    sample_format: str = "image"  # key of ldm.data.samples.SAMPLE_FORMATS ("image"; "latent" is registered by the latent tools)
    max_empty_shards: int = 64  # consecutive unreadable/empty shards before a resampled worker raises (no endless loop)
    max_rejected_streak: int = 100_000  # consecutive skipped or filtered samples before a resampled worker raises

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ConfigError(f"DataConfig.crop must be 'center' or 'random', got {self.crop!r}")
        if self.batch_size < 1 or self.num_workers < 0 or self.batches_per_epoch < 1:
            raise ConfigError("DataConfig: batch_size and batches_per_epoch must be >= 1 and num_workers >= 0")
        for name in ("flip_prob", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"DataConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.buckets is not None:
            self.buckets = [tuple(int(v) for v in b) for b in self.buckets]
            if not self.buckets or any(len(b) != 2 or min(b) < 1 for b in self.buckets):
                raise ConfigError(f"DataConfig.buckets must be a non-empty list of (height, width), got {self.buckets}")
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise ConfigError(f"DataConfig.background must be [r, g, b] of 0-255, got {self.background}")
        if self.resolution < 1 or self.max_empty_shards < 1 or self.max_rejected_streak < 1:
            raise ConfigError("DataConfig: resolution, max_empty_shards and max_rejected_streak must be >= 1, got "
                              f"{self.resolution}, {self.max_empty_shards} and {self.max_rejected_streak}")

    @property
    def sample_filter(self) -> SampleFilter:
        """The metadata filter these thresholds describe."""
        return SampleFilter(
            min_size=self.min_size,
            max_aspect_ratio=self.max_aspect_ratio,
            min_similarity=self.min_similarity,
            max_watermark=self.max_watermark,
            max_punsafe=self.max_punsafe,
            min_aesthetic=self.min_aesthetic,
        )

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Output (h, w) sizes: the buckets, or the one square resolution."""
        return list(self.buckets) if self.buckets else [(self.resolution, self.resolution)]
