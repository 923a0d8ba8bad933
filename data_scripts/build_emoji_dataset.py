"""Build an offline captioned emoji dataset from published packages ("an emoji of a red apple, twemoji style").

Sources: npm `emoji-datasource-{twitter,google,apple}` (64 px PNGs), npm `openmoji` and `@twemoji/svg` (SVGs, rendered
with cairosvg at any --resolution when installed) and Debian's `fonts-noto-color-emoji` (CBDT bitmaps rendered with PIL at size 109). Labels come from npm
`emojibase-data` (or the `emoji` PyPI package). Output: `OUT/train/NNNNN.tar`, `OUT/validation/NNNNN.tar` in
img2dataset layout, split by a hash of the emoji's code points (one emoji is in the same split in every style),
and `OUT/stats.json` with the sample count of each source.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm.atomic import atomic_write_text
from ldm.data.emoji import (SOURCES, EmojiRecord, datasource_records, emoji_caption, emojibase_labels, openmoji_records,
                            split_of, twemoji_svg_records)
from ldm.data.shards import AtomicShardWriter, encode_image, make_record
from ldm.data.transforms import to_rgb
from ldm.cli.common import cli_main
from ldm.errors import LdmError

NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_BITMAP_SIZE = 109  # the only size Noto Color Emoji's CBDT bitmaps come in


def npm_package(name: str, cache: Path) -> Path:
    """Download `name` with `npm pack` into cache (once) and unpack it; returns the unpacked `package/` folder."""
    unpacked = cache / name / "package"
    if unpacked.is_dir():
        return unpacked
    if shutil.which("npm") is None:
        raise LdmError(f"npm is needed to download {name}: install Node.js (apt-get install npm) or drop that source")
    (cache / name).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["npm", "pack", name, "--silent", "--pack-destination", str(cache / name)],
                            capture_output=True, text=True)
    tarballs = sorted((cache / name).glob("*.tgz"))
    if result.returncode != 0 or not tarballs:
        raise LdmError(f"npm pack {name} failed (is the npm registry reachable?): {result.stderr.strip()[-500:]}")
    tmp = cache / name / ".unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarballs[-1]) as tar:
        tar.extractall(tmp, filter="data")
    os.replace(tmp / "package", unpacked)
    shutil.rmtree(tmp, ignore_errors=True)
    return unpacked


def package_text(path: Path) -> str:
    """A text file of an unpacked package as UTF-8; a damaged one is an LdmError naming the file, line and way out."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LdmError(f"{path} line {line} is not UTF-8 text (byte {e.start}): the cached download is damaged; "
                       "delete its package folder under --cache-dir to fetch it again") from e


def package_json(path: Path):
    """A JSON file of an unpacked package; a damaged one is an LdmError naming the file."""
    try:
        return json.loads(package_text(path))
    except ValueError as e:
        raise LdmError(f"{path} is not valid JSON ({e}): the cached download is damaged; delete its package folder "
                       "under --cache-dir to fetch it again") from e


def package_version(folder: Path) -> str:
    """The `version` field of an unpacked npm package."""
    return package_json(folder / "package.json").get("version", "?")


def load_labels(cache: Path) -> dict:
    """{hexcode: (label, tags)} from emojibase-data, else from the `emoji` PyPI package, else {} (names from the source)."""
    try:
        folder = npm_package("emojibase-data", cache)
        return emojibase_labels(package_json(folder / "en" / "data.json"))
    except LdmError as e:
        print(f"warning: {e}; trying the emoji PyPI package for labels", file=sys.stderr)
    try:
        import emoji as emoji_pkg
    except ImportError:
        return {}
    labels = {}
    for text, data in emoji_pkg.EMOJI_DATA.items():
        hexcode = "-".join(f"{ord(c):X}" for c in text if ord(c) != 0xFE0F)
        labels[hexcode] = (data["en"].strip(":").replace("_", " "), [])
    return labels


def square(image: Image.Image, resolution: int, background: tuple[int, int, int]) -> Image.Image:
    """Composite over the background, pad to a centred square and resize to resolution x resolution."""
    image = to_rgb(image, background)
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS) if side != resolution else canvas


def datasource_images(name: str, cache: Path, labels: dict, limit: int | None):
    """(record, RGBA image or skip reason) pairs from emoji-datasource-<name>."""
    folder = npm_package(f"emoji-datasource-{name}", cache)
    records = datasource_records(package_json(folder / "emoji.json"), name, labels)[:limit]
    for record in records:
        path = folder / "img" / name / "64" / record.image
        yield record, (Image.open(path) if path.is_file() else "missing_image")


def strip_openmoji_grid(svg: bytes) -> bytes:
    """Remove the design-grid layer (`<g id="grid">`) that openmoji's source SVGs carry."""
    import xml.etree.ElementTree as ET

    ET.register_namespace("", "http://www.w3.org/2000/svg")
    root = ET.fromstring(svg)
    for parent in list(root.iter()):
        for child in list(parent):
            if child.get("id") == "grid":
                parent.remove(child)
    return ET.tostring(root)


def svg_renderer():
    """cairosvg's `svg2png`, or an LdmError saying how to install it (the SVG sources need it)."""
    try:
        import cairosvg
    except (ImportError, OSError) as e:
        raise LdmError(f"SVG sources (openmoji, twemoji-svg) need cairosvg to render: pip install cairosvg ({e})") from e
    return cairosvg.svg2png


def render_svgs(folder: Path, records: list, resolution: int, clean=lambda svg: svg):
    """(record, RGBA image or skip reason) pairs: each record's SVG (`record.image`, inside folder) rendered at
    resolution x resolution with cairosvg."""
    svg2png = svg_renderer()
    for record in records:
        try:
            png = svg2png(bytestring=clean((folder / record.image).read_bytes()), output_width=resolution,
                          output_height=resolution)
        except Exception:  # noqa: BLE001 - cairosvg fails on a few SVG features; such an emoji is counted and skipped
            yield record, "render_error"
            continue
        yield record, Image.open(io.BytesIO(png))


def openmoji_images(cache: Path, resolution: int, limit: int | None):
    """(record, RGBA image or skip reason) pairs from openmoji's SVGs, rendered with cairosvg."""
    svg_renderer()  # fail before the download when cairosvg is missing
    folder = npm_package("openmoji", cache)
    records = [r for r in openmoji_records(package_text(folder / "data" / "openmoji.csv")) if (folder / r.image).is_file()]
    return render_svgs(folder, records[:limit], resolution, strip_openmoji_grid)


def twemoji_svg_images(cache: Path, labels: dict, resolution: int, limit: int | None):
    """(record, RGBA image or skip reason) pairs from `@twemoji/svg`, rendered with cairosvg: the records (labels,
    hexcodes, so splits) of emoji-datasource-twitter, the vector artwork of the same emoji."""
    svg_renderer()
    folder = npm_package("@twemoji/svg", cache)
    datasource = npm_package("emoji-datasource-twitter", cache)
    records = datasource_records(package_json(datasource / "emoji.json"), "twitter", labels)
    names = sorted(path.name for path in folder.glob("*.svg"))
    return render_svgs(folder, twemoji_svg_records(records, names)[:limit], resolution)


def noto_font_images(font_path: str, labels: dict, limit: int | None):
    """(record, RGBA image or skip reason) pairs rendered from the Noto Color Emoji font for every labelled emoji it has a glyph for."""
    if not Path(font_path).is_file():
        raise LdmError(f"font {font_path} not found: apt-get install fonts-noto-color-emoji, or pass --font")
    try:
        font = ImageFont.truetype(font_path, NOTO_BITMAP_SIZE)
    except OSError as e:
        raise LdmError(f"PIL cannot load {font_path} at size {NOTO_BITMAP_SIZE} (needs FreeType with PNG support): {e}") from e
    glyph = font.getbbox("\U0001F600")
    records = [EmojiRecord(h, label, "", tags) for h, (label, tags) in sorted(labels.items())][:limit]
    for record in records:
        box = font.getbbox(record.text)
        if box[2] - box[0] > 1.2 * (glyph[2] - glyph[0]):  # a sequence the font does not ligate: several glyphs
            yield record, "no_glyph"
            continue
        image = Image.new("RGBA", (glyph[2], glyph[3]), (0, 0, 0, 0))
        ImageDraw.Draw(image).text((0, 0), record.text, font=font, embedded_color=True)
        yield record, (image if image.getbbox() else "no_glyph")


def build(args: argparse.Namespace) -> dict:
    """Write the shards; returns the per-source counts."""
    cache = Path(args.cache_dir).expanduser()
    background = tuple(int(v) for v in args.background.split(","))
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise LdmError(f"unknown --sources {unknown}; known: {sorted(SOURCES)}")
    labels = load_labels(cache)
    out = Path(args.out)
    stats: dict[str, dict] = {}
    writers = {split: AtomicShardWriter(out / split, args.samples_per_shard) for split in ("train", "validation")}
    try:
        for source in sources:
            counts: Counter = Counter()
            try:
                if source == "openmoji":
                    pairs, version = openmoji_images(cache, args.resolution, args.limit), package_version(npm_package("openmoji", cache))
                elif source == "twemoji-svg":
                    pairs = twemoji_svg_images(cache, labels, args.resolution, args.limit)
                    version = package_version(npm_package("@twemoji/svg", cache))
                elif source == "noto-font":
                    pairs, version = noto_font_images(args.font, labels, args.limit), "debian"
                else:
                    pairs, version = datasource_images(source, cache, labels, args.limit), package_version(npm_package(f"emoji-datasource-{source}", cache))
                for record, image in tqdm(pairs, desc=source, unit="img"):
                    if isinstance(image, str):  # the reason this emoji has no image
                        counts[f"skipped_{image}"] += 1
                        continue
                    split = split_of(record.hexcode, args.validation_fraction)
                    caption = emoji_caption(record.label, source)
                    meta = {
                        "source": source, "style": SOURCES[source][0], "license": SOURCES[source][1], "package": SOURCES[source][2],
                        "package_version": version, "hexcode": record.hexcode, "emoji": record.text, "label": record.label,
                        "tags": record.tags, "split": split, "width": args.resolution, "height": args.resolution,
                        "original_width": image.width, "original_height": image.height,
                    }
                    picture = square(image, args.resolution, background)
                    key = f"{source.replace('-', '')}_{record.hexcode.lower().replace('-', '_')}"
                    writers[split].write(make_record(key, encode_image(picture, args.image_format), args.image_format, caption, meta))
                    counts[split] += 1
            except LdmError as e:
                print(f"warning: source {source} skipped: {e}", file=sys.stderr)
                counts["error"] = str(e)
            stats[source] = dict(counts)
    finally:
        for writer in writers.values():
            writer.close()
    stats["_total"] = {split: w.total for split, w in writers.items()}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (gets train/, validation/, stats.json)")
    parser.add_argument("--cache-dir", default="~/.cache/ldm/emoji", help="where npm packages are downloaded and unpacked")
    parser.add_argument("--sources", default="twitter,google,openmoji", help=f"comma-separated, from {sorted(SOURCES)}")
    parser.add_argument("--resolution", type=int, default=64, help="output side in pixels")
    parser.add_argument("--background", default="255,255,255", help="R,G,B behind transparent pixels")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"])
    parser.add_argument("--font", default=NOTO_FONT, help="Noto Color Emoji font for the noto-font source")
    parser.add_argument("--limit", type=int, default=None, help="at most this many emoji per source (quick runs)")
    args = parser.parse_args(argv)
    stats = build(args)
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
