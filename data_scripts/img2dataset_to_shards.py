"""img2dataset inputs -> validated, filtered img2dataset-layout shards.

Two ways in:
- `--url-list FILE` (parquet, csv, tsv, txt, json(l) of URLs and captions, e.g. a LAION parquet): calls the
  `img2dataset` package (not a dependency of ldm: `pip install img2dataset`; it needs network access to the image
  hosts) into OUT/_download, then re-validates as below.
- `--input SHARDS` (an existing img2dataset output folder, a brace pattern or any shard URL ldm's loader accepts):
  every sample is decoded, checked for a caption and passed through the same filters as training
  (ldm.data.filters.SampleFilter); the survivors are re-sharded into OUT with their original bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ldm.atomic import atomic_write_text
from ldm.data.filters import SampleFilter, original_size
from ldm.data.loader import expand_shards
from ldm.data.samples import SkipSample, read_caption, read_meta
from ldm.data.shards import AtomicShardWriter, image_member, iter_raw_samples
from ldm.data.transforms import CorruptImage, decode_image
from ldm.cli.common import cli_main
from ldm.errors import LdmError


def download(url_list: str, out: Path, args: argparse.Namespace) -> Path:
    """Run img2dataset into out/_download (webdataset output); returns that folder."""
    try:
        from img2dataset import download as img2dataset_download
    except ImportError as e:
        raise LdmError(
            "downloading a URL list needs the img2dataset package and network access to the image hosts: "
            "pip install img2dataset, or pass --input with an existing img2dataset output folder"
        ) from e
    if not Path(url_list).exists():
        raise LdmError(f"URL list {url_list} not found")
    staging = out / "_download"
    extra = [c for c in (args.save_additional_columns or "").split(",") if c]
    img2dataset_download(
        url_list=url_list, output_folder=str(staging), output_format="webdataset", input_format=args.input_format,
        url_col=args.url_col, caption_col=args.caption_col, image_size=args.image_size, resize_mode=args.resize_mode,
        processes_count=args.processes, thread_count=args.threads, number_sample_per_shard=args.samples_per_shard,
        save_additional_columns=extra or None, enable_wandb=False,
    )
    succeeded = 0
    for stats_file in staging.glob("*_stats.json"):
        succeeded += json.loads(stats_file.read_text()).get("successes", 0)
    if succeeded == 0:
        raise LdmError(f"img2dataset downloaded no image from {url_list}: is the network reachable? (see {staging}/*_stats.json)")
    return staging


def revalidate(shards: list[str], out: Path, sample_filter: SampleFilter, samples_per_shard: int = 1000,
               caption_key: str = "txt", progress: bool = True) -> dict:
    """Copy every decodable, captioned sample that passes the filter into new shards; returns counts by reason."""
    counts: Counter = Counter()

    def on_error(exn: Exception) -> bool:
        counts["skipped_tar_error"] += 1
        return True

    with AtomicShardWriter(out, samples_per_shard) as writer:
        for raw in tqdm(iter_raw_samples(shards, handler=on_error), desc="samples", unit="img", disable=not progress):
            try:
                caption = read_caption(raw, caption_key)
                member = image_member(raw)
                if member is None:
                    raise SkipSample("no_image")
                meta = read_meta(raw)
                try:
                    image = decode_image(member[1])
                except CorruptImage as e:
                    raise SkipSample("corrupt_image") from e
            except SkipSample as e:
                counts[f"skipped_{e.reason}"] += 1
                continue
            reason = sample_filter.reject_reason(meta, image.size)
            if reason is not None:
                counts[f"filtered_{reason}"] += 1
                continue
            width, height = original_size(meta, image.size)
            meta.update(width=image.width, height=image.height, caption=caption)
            meta.setdefault("original_width", width)
            meta.setdefault("original_height", height)
            key = raw["__key__"].replace("/", "_").replace(".", "_")
            meta["key"] = key
            writer.write({"__key__": key, member[0]: member[1], "txt": caption.encode("utf-8"),
                          "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
            counts["written"] += 1
    stats = {**counts, "shards": len(writer.shards)}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url-list", help="parquet/csv/tsv/txt/jsonl of URLs (+ captions) to download with img2dataset")
    source.add_argument("--input", help="existing shards: img2dataset output folder, brace pattern, URL or pipe:")
    parser.add_argument("--out", required=True, help="output folder for validated NNNNN.tar shards and stats.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--caption-key", default="txt")
    group = parser.add_argument_group("filters (the same as DataConfig's; a score missing from the json passes)")
    group.add_argument("--min-size", type=int, default=None, help="shorter original side in pixels")
    group.add_argument("--max-aspect-ratio", type=float, default=None)
    group.add_argument("--min-similarity", type=float, default=None)
    group.add_argument("--max-watermark", type=float, default=None)
    group.add_argument("--max-punsafe", type=float, default=None)
    group.add_argument("--min-aesthetic", type=float, default=None)
    group = parser.add_argument_group("img2dataset download (only with --url-list)")
    group.add_argument("--input-format", default="parquet", choices=["parquet", "csv", "tsv", "txt", "json", "jsonl"])
    group.add_argument("--url-col", default="URL")
    group.add_argument("--caption-col", default="TEXT")
    group.add_argument("--save-additional-columns", default="similarity,pwatermark,punsafe",
                       help="comma-separated parquet columns copied into each sample's json")
    group.add_argument("--image-size", type=int, default=512)
    group.add_argument("--resize-mode", default="keep_ratio", choices=["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"])
    group.add_argument("--processes", type=int, default=2)
    group.add_argument("--threads", type=int, default=32)
    args = parser.parse_args(argv)
    sample_filter = SampleFilter(args.min_size, args.max_aspect_ratio, args.min_similarity, args.max_watermark,
                                 args.max_punsafe, args.min_aesthetic)
    out = Path(args.out)
    source_shards = str(download(args.url_list, out, args)) if args.url_list else args.input
    stats = revalidate(expand_shards(source_shards), out, sample_filter, args.samples_per_shard, args.caption_key)
    print(json.dumps(stats, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
