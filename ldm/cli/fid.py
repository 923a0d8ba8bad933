"""ldm-fid: FID between two image folders or pytorch-fid style .npz statistics (TF-compatible Inception features).

Several GPUs: `accelerate launch -m ldm.cli.fid A B` (each process takes a share of the
images; their feature moments are gathered and merged).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m ldm.cli.fid: imported again inside the Ctrl-C guard (scripts.py)
    from ldm.cli.scripts import run_as_main

    run_as_main("ldm.cli.fid")

import argparse
import os
import sys
from pathlib import Path

import torch

from ldm.cli.common import cli_main, launched_accelerator
from ldm.errors import LdmError
from ldm.eval.features import compute_features
from ldm.eval.frechet import fid, load_stats, save_stats
from ldm.eval.imagefolder import list_images
from ldm.eval.inception import FEATURE_DIM, RESIZERS, InceptionExtractor, extractor_name, stats_space
from ldm.runtime import resolve_device
from ldm.writable import check_output_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-fid", description=__doc__.split("\n")[0])
    p.add_argument("path1", help="folder of images or .npz with mu and sigma")
    p.add_argument("path2", nargs="?", help="folder of images or .npz (may be left out with --save-stats)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write PATH1's statistics (pytorch-fid compatible .npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-stats file")
    p.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="weights-inception-2015-12-05-6726825d.pth (default: $LDM_INCEPTION_WEIGHTS, torch hub cache, download)",
    )
    p.add_argument("--resizer", choices=RESIZERS, default=RESIZERS[0],
                   help="how images reach 299x299: tf-bilinear (torch-fidelity / pytorch-fid, the default) or "
                        "pil-bicubic (clean-fid's filter)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding workers")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--recursive", action="store_true", help="also take images from subfolders")
    return p


def run(args: argparse.Namespace) -> float | None:
    if args.path2 is None and args.save_stats is None:
        raise LdmError("give two paths to compare, or one path with --save-stats OUT.npz")
    if args.batch_size < 1:
        raise LdmError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_workers < 0:
        raise LdmError(f"--num-workers must be 0 (decode in this process) or more, got {args.num_workers}")
    if args.save_stats is not None:
        if Path(args.save_stats).suffix != ".npz":  # ldm-fid reads statistics back from .npz paths only
            raise LdmError(f"--save-stats {args.save_stats}: name the statistics file *.npz")
        check_output_path(args.save_stats, "--save-stats", folder=False, overwrite=args.overwrite)
    paths = [Path(p) for p in (args.path1, args.path2) if p is not None]
    space = extractor_name(args.resizer)  # the feature space of the images' statistics
    loaded = {}
    for p in paths:  # check both inputs, statistics files read, before spending minutes on the first
        if p.suffix == ".npz":
            if not p.is_file():
                raise LdmError(f"{p}: no such statistics file")
            held = loaded[p] = load_stats(p)
            held.extractor = stats_space(held)  # a pytorch-fid file: TF Inception with the default resizer
            images_too = any(q.suffix != ".npz" for q in paths)
            if images_too and (held.extractor, held.dim) != (space, FEATURE_DIM):
                raise LdmError(
                    f"{p}: holds {held.dim}-d statistics of {held.extractor!r}, but the images are measured as "
                    f"{space!r} ({FEATURE_DIM}-d, --resizer {args.resizer}); FID compares only one feature "
                    "space: pass the --resizer the statistics were made with, or make them again from the reference "
                    "images with ldm-fid REF --save-stats"
                )
        elif len(list_images(p, args.recursive)) < 2:
            raise LdmError(f"{p}: one image; FID needs at least 2 (it compares covariances)")
    accelerator = launched_accelerator(args.device)
    device = accelerator.device if accelerator else torch.device(resolve_device(args.device))
    main_process = accelerator is None or accelerator.is_main_process
    extractor = None
    stats = []
    for p in paths:
        if p.suffix == ".npz":
            stats.append(loaded[p])
            continue
        if extractor is None:
            extractor = InceptionExtractor(args.inception_weights, device=device, resizer=args.resizer)
        images = list_images(p, args.recursive)
        feats = compute_features(
            images,
            extractor,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            keep=False,
            accelerator=accelerator,
            desc=p.name,
        )
        stats.append(feats.moments.to_stats(extractor.name))
        if main_process:
            print(f"{p}: {stats[-1].n} images", file=sys.stderr)
    if args.save_stats and main_process:
        save_stats(args.save_stats, stats[0])
        print(f"wrote statistics of {paths[0]} to {args.save_stats}", file=sys.stderr)
    if len(stats) < 2:
        return None
    value = fid(stats[0], stats[1])
    if main_process:
        print(f"{value:.8g}")
    return value


@cli_main
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
