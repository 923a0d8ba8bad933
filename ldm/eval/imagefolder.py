"""Image folders: listing, decoding with clear errors, and the HF imagefolder `metadata.jsonl` captions."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ldm.errors import LdmError
from ldm.imagemodes import to_rgb8
from ldm.textfiles import read_jsonl

# pytorch-fid's list (a folder is counted as it counts it), matched case-insensitively
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".pgm", ".ppm")


@dataclass
class CaptionedImage:
    """One row of `metadata.jsonl`: an image file (relative to the folder) and its prompt."""

    file_name: str
    text: str
    path: Path
    category: str | None = None


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files of a folder (top level only unless `recursive`, as pytorch-fid).

    Hidden files and folders are skipped: they hold the temporaries of atomic writes (a killed run leaves them).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"{folder}: not a folder of images (nor an existing .npz statistics file)")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(
        p
        for p in pattern
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not paths:
        raise LdmError(
            f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{' in all subfolders' if recursive else '; use --recursive for subfolders'})"
        )
    return paths


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to 8-bit RGB (alpha dropped, as pytorch-fid and torch-fidelity do; 16-bit rescaled)."""
    try:
        with Image.open(path) as img:
            return to_rgb8(img, str(path))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LdmError(f"{path}: cannot read image ({e}); remove or replace the file") from e


def image_sizes(paths: Iterable[str | os.PathLike]) -> Counter:
    """How many of the files have each `(width, height)`, read from their headers (no pixels are decoded)."""
    sizes: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes[img.size] += 1
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise LdmError(f"{path}: cannot read image ({e}); remove or replace the file") from e
    return sizes


LISTED_SIZES = 4  # more distinct sizes than this are stated as ranges


def describe_sizes(sizes: Mapping[tuple[int, int], int]) -> str:
    """An image set's count and sizes as the protocol line states them: `12 images at 512x512` when all are alike;
    `12 images, sizes: 512x512 (10), 256x256 (2)` (most frequent first) for a few; else the ranges and the commonest,
    `40 images in 7 sizes, widths 256-1024, heights 192-768, most often 512x512 (30)`."""
    n = sum(sizes.values())
    order = sorted(sizes.items(), key=lambda item: (-item[1], -item[0][0], -item[0][1]))
    if len(order) == 1:
        return f"{n} images at {order[0][0][0]}x{order[0][0][1]}"
    if len(order) <= LISTED_SIZES:
        return f"{n} images, sizes: " + ", ".join(f"{w}x{h} ({k})" for (w, h), k in order)
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    (w, h), k = order[0]
    return (f"{n} images in {len(order)} sizes, widths {min(widths)}-{max(widths)}, heights {min(heights)}-"
            f"{max(heights)}, most often {w}x{h} ({k})")


def read_metadata(folder: str | os.PathLike) -> list[CaptionedImage]:
    """Rows of `folder/metadata.jsonl` (`{"file_name": ..., "text": ...}` per line), files checked to exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"{folder}: not a folder")
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise LdmError(
            f"{folder}: no metadata.jsonl; write one line per image such as "
            '{"file_name": "0001.png", "text": "a red cube"} (Hugging Face imagefolder convention)'
        )
    rows = []
    for lineno, row in read_jsonl(meta, "metadata.jsonl"):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise LdmError(f'{meta}:{lineno}: each line needs string fields "file_name" and "text", got {str(row)[:200]}')
        name = os.path.normpath(row["file_name"])
        # Lexically, so that symlinked images still work: "../x" or "/x" would read outside the folder.
        if os.path.isabs(name) or name == ".." or name.startswith(".." + os.sep):
            raise LdmError(f"{meta}:{lineno}: file_name {row['file_name']!r} points outside {folder}; "
                           "name images relative to the folder")
        path = folder / name
        if not path.is_file():
            raise LdmError(f"{meta}:{lineno}: image {row['file_name']!r} does not exist in {folder}")
        rows.append(CaptionedImage(row["file_name"], row["text"], path, row.get("category")))
    if not rows:
        raise LdmError(f"{meta}: no images listed (the file is empty)")
    return rows
