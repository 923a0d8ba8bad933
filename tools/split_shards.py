"""Regroup webdataset shards into N plain .tar shards, round-robin by sample key, so every loader worker has some.

webdataset hands each data-loader worker whole shards: 8 shards under 14 workers leave 6 idle, and one shard kept
one worker busy and the GPU waiting (190 img/s in the first SR run). The device scripts carry a few compressed
parts (a transfer is limited in size) and split them here into as many shards as there are workers, or a multiple.

    python tools/split_shards.py --out /tmp/data --shards 28 .dev/u*/train-*.tar.gz
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import tarfile
from pathlib import Path

# webdataset's rule (`base_plus_ext`): the key is the path up to the first dot of the file name
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class SplitError(Exception):
    """An input that cannot be regrouped without losing or mixing samples."""


def read_samples(parts: list[str]) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over all parts (a key's members are kept together)."""
    samples: dict[str, dict[str, bytes]] = {}
    for part in parts:
        with tarfile.open(part) as tar:  # plain or compressed: tarfile detects it
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                m = MEMBER_NAME.match(member.name)
                if m is None:
                    raise SplitError(f"{part}: member {member.name!r} has no KEY.EXT name (webdataset's layout)")
                key, ext = m.groups()
                members = samples.setdefault(key, {})
                if ext in members:  # the same sample in two parts (or twice in one): refuse rather than drop one
                    raise SplitError(f"{part}: {member.name} appears twice among the parts (a sample given twice); "
                                     "give each part once")
                members[ext] = tar.extractfile(member).read()
    return samples


def write_shards(samples: dict[str, dict[str, bytes]], out: Path, n: int) -> list[Path]:
    """Sample i (in key order) goes to shard i mod n; each shard is written under a temporary name, then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:05d}.tar" for i in range(n)]
    writers = [tarfile.open(f"{p}.tmp", "w") for p in paths]
    for i, (key, members) in enumerate(sorted(samples.items())):
        for ext, data in sorted(members.items()):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            writers[i % n].addfile(info, io.BytesIO(data))
    for writer, path in zip(writers, paths):
        writer.close()
        Path(f"{path}.tmp").replace(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", help="input shards (.tar, .tar.gz)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args(argv)
    missing = [p for p in args.parts if not Path(p).is_file()]
    if missing:
        print(f"error: input shard(s) not found: {missing}", file=sys.stderr)
        return 2
    if args.shards < 1:
        print("error: --shards must be at least 1", file=sys.stderr)
        return 2
    try:
        samples = read_samples(args.parts)
    except (SplitError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_shards(samples, args.out, args.shards)
    print(f"{len(samples)} samples from {len(args.parts)} part(s) in {args.shards} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
