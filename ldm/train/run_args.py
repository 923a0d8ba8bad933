"""The command line every training tool shares: --config, data, output folder, steps, resume and dotted overrides."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

from ldm.config import apply_overrides, from_dict, load_yaml

T = TypeVar("T")


def run_parser(prog: str, doc: str, config_help: str, overrides_example: str,
               val_data: bool = False) -> argparse.ArgumentParser:
    """The shared parser; `val_data` adds --val-data (held-out shards for validation)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help=config_help)
    p.add_argument("--train-data", default=None, help="webdataset shards: folder, glob, brace pattern, URL (data.shards)")
    if val_data:
        p.add_argument("--val-data", default=None, help="held-out shards for validation metrics (validation.shards)")
    p.add_argument("--output-dir", default=None, help="run folder (output_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps to train up to (max_steps)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", default=None, help="'latest' (the newest complete checkpoint in the run folder, or a "
                     "fresh start when there is none) or a checkpoint folder")
    run.add_argument("--overwrite", action="store_true", help="delete the run already in --output-dir and start "
                     "again (without it or --resume, a fresh run needs an empty or new folder)")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides_example}")
    return p


def resolve_run_config(args: argparse.Namespace, cls: type[T]) -> T:
    """YAML -> named flags -> dotted overrides -> `cls` (unknown keys rejected)."""
    data = load_yaml(args.config)
    # Shard patterns are set directly: a brace pattern must not be read as YAML.
    if args.train_data is not None:
        data["data"] = {**(data.get("data") or {}), "shards": args.train_data}
    if getattr(args, "val_data", None) is not None:
        data["validation"] = {**(data.get("validation") or {}), "shards": args.val_data}
    if args.output_dir is not None:
        data["output_dir"] = args.output_dir
    if args.max_steps is not None:
        data["max_steps"] = args.max_steps
    return from_dict(cls, apply_overrides(data, args.overrides), where=str(args.config))
