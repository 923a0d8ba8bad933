"""Image folders: listing, decoding with clear errors, and the HF imagefolder `metadata.jsonl` captions."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ldm.errors import LdmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class CaptionedImage:
    """One row of `metadata.jsonl`: an image file (relative to the folder) and its prompt."""

    file_name: str
    text: str
    path: Path
    category: str | None = None


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files of a folder (top level only unless `recursive`, as pytorch-fid)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"{folder}: not a folder of images (nor an existing .npz statistics file)")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise LdmError(
            f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{' in all subfolders' if recursive else '; use --recursive for subfolders'})"
        )
    return paths


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to 8-bit RGB (alpha dropped, as pytorch-fid and torch-fidelity do)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LdmError(f"{path}: cannot read image ({e}); remove or replace the file") from e


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
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LdmError(f"{meta}:{lineno}: not valid JSON ({e})") from e
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise LdmError(f'{meta}:{lineno}: each line needs string fields "file_name" and "text", got {line[:200]}')
        path = folder / row["file_name"]
        if not path.is_file():
            raise LdmError(f"{meta}:{lineno}: image {row['file_name']!r} does not exist in {folder}")
        rows.append(CaptionedImage(row["file_name"], row["text"], path, row.get("category")))
    if not rows:
        raise LdmError(f"{meta}: no images listed (the file is empty)")
    return rows
