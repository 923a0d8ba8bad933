"""Pack a folder of captioned images into img2dataset-layout shards (key, jpg/png/webp, txt, json).

Captions come from `metadata.jsonl` or `metadata.csv` at the folder's root (columns `file_name` and `text` or
`caption`, the Hugging Face imagefolder convention), else from a `.txt` file beside each image (same stem).
Images keep their bytes unless --max-size asks for a resize; other formats (bmp, gif, tiff) become PNG.
Images without a caption, captions that are not UTF-8 and unreadable images are skipped and counted (stats.json).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ldm.atomic import atomic_write_text
from ldm.data.shards import AtomicShardWriter, encode_image, make_record
from ldm.data.transforms import CorruptImage, decode_image
from ldm.cli.common import cli_main
from ldm.errors import LdmError

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": None, ".gif": None, ".tif": None, ".tiff": None}
CAPTION_COLUMNS = ("text", "caption")


NOT_UTF8 = object()  # the caption of a sample whose text is not UTF-8: skipped and counted, not a crash


def _decoded(text: str) -> str | object:
    """`text` as read with errors="surrogateescape", or NOT_UTF8 when it held bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    return text


def read_metadata(root: Path) -> dict[str, str | object] | None:
    """{relative file name: caption} from metadata.jsonl or metadata.csv, or None when neither exists."""
    rows: list[dict] = []
    # surrogateescape: one caption that is not UTF-8 spoils its own sample, not the file (and the file names,
    # decoded the same way, still match the paths found on disk)
    if (root / "metadata.jsonl").is_file():
        text = (root / "metadata.jsonl").read_text(encoding="utf-8", errors="surrogateescape")
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise LdmError(f"{root / 'metadata.jsonl'} line {number} is not JSON: {e}") from e
    elif (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
    else:
        return None
    captions = {}
    for row in rows:
        column = next((c for c in CAPTION_COLUMNS if c in row), None)
        if "file_name" not in row or column is None:
            raise LdmError(f"metadata in {root} needs columns file_name and one of {CAPTION_COLUMNS}; got {sorted(row)}")
        captions[str(Path(row["file_name"]))] = _decoded(str(row[column]))
    return captions


def find_images(root: Path) -> list[Path]:
    """Image files under root, sorted by relative path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def caption_for(path: Path, root: Path, metadata: dict[str, str | object] | None) -> str | object | None:
    """The image's caption (metadata first, else the .txt beside it), stripped; None when there is none, NOT_UTF8."""
    if metadata is not None:
        text = metadata.get(str(path.relative_to(root)))
    else:
        txt = path.with_suffix(".txt")
        text = _decoded(txt.read_text(encoding="utf-8", errors="surrogateescape")) if txt.is_file() else None
    if text is NOT_UTF8:
        return NOT_UTF8
    return text.strip() if text and text.strip() else None


def convert(root: Path, out: Path, samples_per_shard: int = 1000, max_size: int | None = None,
            image_format: str | None = None, progress: bool = True) -> dict:
    """Write shards of every captioned, readable image under root; returns counts."""
    if not root.is_dir():
        raise LdmError(f"input folder {root} not found")
    metadata = read_metadata(root)
    images = find_images(root)
    if not images:
        raise LdmError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    counts: Counter = Counter()
    with AtomicShardWriter(out, samples_per_shard) as writer:
        for path in tqdm(images, desc="images", unit="img", disable=not progress):
            caption = caption_for(path, root, metadata)
            if caption is None:
                counts["skipped_no_caption"] += 1
                continue
            if caption is NOT_UTF8:
                counts["skipped_caption_not_utf8"] += 1
                continue
            data = path.read_bytes()
            try:
                image = decode_image(data)
            except CorruptImage:
                counts["skipped_corrupt"] += 1
                continue
            original = image.size
            ext = IMAGE_SUFFIXES[path.suffix.lower()]
            if max_size is not None and min(image.size) > max_size:
                scale = max_size / min(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
                ext = None
            if ext is None or (image_format is not None and image_format != ext):
                ext = image_format or "png"
                data = encode_image(image, ext)
            meta = {"width": image.width, "height": image.height, "original_width": original[0],
                    "original_height": original[1], "file_name": str(path.relative_to(root)), "status": "success"}
            writer.write(make_record(f"{counts['written']:09d}", data, ext, caption, meta))
            counts["written"] += 1
    stats = {**counts, "shards": len(writer.shards)}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="folder of images with captions")
    parser.add_argument("--out", required=True, help="output folder for NNNNN.tar shards and stats.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-size", type=int, default=None, help="downscale so the shorter side is at most this")
    parser.add_argument("--image-format", default=None, choices=["jpg", "png", "webp"], help="re-encode every image")
    args = parser.parse_args(argv)
    stats = convert(Path(args.input), Path(args.out), args.samples_per_shard, args.max_size, args.image_format)
    print(json.dumps(stats, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
