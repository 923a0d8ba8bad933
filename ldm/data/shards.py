"""Writing and reading img2dataset-layout shards: `NNNNN.tar` of (key, jpg/png/webp, txt, json), written atomically."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds
from PIL import Image

from ldm.data.transforms import IMAGE_EXTENSIONS


def encode_image(image: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    """PIL image -> bytes in `fmt` ("jpg", "png" or "webp")."""
    buffer = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"image format must be one of {IMAGE_EXTENSIONS}, got {fmt!r}")
    return buffer.getvalue()


def make_record(key: str, image_bytes: bytes, image_ext: str, caption: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One img2dataset-style sample: key, image, txt, and json holding key + caption + `meta`."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not hold '.' or '/' (webdataset splits names at the first dot)")
    return {
        "__key__": key,
        image_ext: image_bytes,
        "txt": caption.encode("utf-8"),
        "json": json.dumps({"key": key, "caption": caption, **meta}, sort_keys=True).encode("utf-8"),
    }


class AtomicShardWriter:
    """webdataset ShardWriter that writes `.NNNNN.tar.tmp` and renames it to `NNNNN.tar` once the shard is closed."""

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 1000, prefix: str = "", start_shard: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shards: list[Path] = []
        self.total = 0
        pattern = str(self.out_dir / f".{prefix}%05d.tar.tmp")
        # mtime=0: the same samples give byte-identical shards; verbose=0: the caller owns the progress bar.
        self._writer = wds.ShardWriter(pattern, maxcount=samples_per_shard, post=self._finish, start_shard=start_shard, verbose=0, mtime=0.0)

    def _finish(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        if self._writer.count == 0:  # ShardWriter opens a shard before the first sample: drop it if none came
            tmp.unlink(missing_ok=True)
            return
        final = tmp.with_name(tmp.name[1:].removesuffix(".tmp"))
        os.replace(tmp, final)
        self.shards.append(final)

    def write(self, record: dict[str, Any]) -> None:
        """Add one sample (a dict as made by make_record)."""
        self._writer.write(record)
        self.total += 1

    def close(self) -> list[Path]:
        """Finish the last shard; returns the shard paths written."""
        if hasattr(self._writer, "shard"):
            self._writer.close()
        return self.shards

    def __enter__(self) -> "AtomicShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written shard under a final name
            if getattr(self._writer, "tarstream", None) is not None:
                self._writer.tarstream.close()
            for tmp in self.out_dir.glob(f".{self.prefix}*.tar.tmp"):
                tmp.unlink(missing_ok=True)


def iter_raw_samples(shards: list[str | os.PathLike], handler=wds.reraise_exception) -> Iterator[dict]:
    """Raw samples (tar members as bytes, plus __key__ and __url__) of shards in order, one pass."""
    yield from wds.tarfile_samples([{"url": str(s)} for s in shards], handler=handler)


def image_member(raw: dict) -> tuple[str, bytes] | None:
    """(extension, bytes) of the first image member of a raw sample, or None."""
    for ext in IMAGE_EXTENSIONS:
        if raw.get(ext):
            return ext, raw[ext]
    return None
