"""Write a synthetic captioned shapes dataset ("a red circle on the left") as img2dataset-layout shards."""
from __future__ import annotations

import argparse
import sys

from ldm.data.synthetic import write_shape_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output folder for NNNNN.tar shards")
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i)")
    parser.add_argument("--image-size", type=int, default=64, help="side in pixels (32-64 is the intended range)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"])
    args = parser.parse_args(argv)
    if not 8 <= args.image_size <= 1024:
        print(f"error: --image-size must be between 8 and 1024, got {args.image_size}", file=sys.stderr)
        return 2
    shards = write_shape_shards(args.out, args.num_samples, args.seed, args.image_size, args.samples_per_shard,
                                args.image_format, progress=True)
    print(f"wrote {args.num_samples} samples in {len(shards)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
