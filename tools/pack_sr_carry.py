"""Pack a byte-limited, diverse subset of 256 px emoji shards for a size-limited transfer (tools/device_train_sr.sh).

    python tools/pack_sr_carry.py data/emoji256/train/*.tar --out .carry/sr/train-a.tar.gz --part 0 --parts 2 \
        --max-bytes 6500000

Skin-tone variants are left out (five near-copies of one design), the rest is dealt round-robin into `--parts`
disjoint parts in a fixed order, and part `--part` is written (images as lossless WebP, no json members) until
`--max-bytes` of WebP is reached. Pixels are unchanged; the loader reads .webp like .png.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.atomic import atomic_path  # noqa: E402
from ldm.cli.common import cli_main  # noqa: E402
from pack_carry import lossless_webp  # noqa: E402  (tools/ is on the path: this script's folder)

SKIN_TONE = re.compile(r"1F3F[B-F]")  # the Fitzpatrick modifiers in a hexcode


def samples(shards: list[str]):
    """(key, png bytes, caption, json) of every sample of the shards, in order."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, parts in members.items():
                yield key, parts["png"], parts["txt"], json.loads(parts["json"])


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/pack_sr_carry.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="uncompressed .tar shards (build_emoji_dataset.py --resolution 256)")
    p.add_argument("--out", required=True, type=Path, help="the .tar.gz to write")
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--max-bytes", type=int, default=6_500_000, help="stop once this much WebP is written")
    args = p.parse_args(argv)
    kept = [s for s in samples(args.shards) if not SKIN_TONE.search(s[3]["hexcode"])]
    total = count = 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp, gzip.open(tmp, "wb", compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for key, png, caption, _ in kept[args.part::args.parts]:
            image = lossless_webp(png)
            if total + len(image) > args.max_bytes:
                break
            add(tar, f"{key}.webp", image)
            add(tar, f"{key}.txt", caption)
            total, count = total + len(image), count + 1
    print(f"{count} of {len(kept)} samples without skin-tone variants ({total / 1e6:.1f} MB of WebP) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
