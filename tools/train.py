"""Train a latent text-to-image diffusion model.

    accelerate launch tools/train.py --config configs/sd-v1.yaml --train-data 'shards/{00000..00999}.tar' \\
        --output-dir runs/sd1 [--max-steps N] [--resume latest|PATH] [key.sub=value ...]
    python tools/train.py --config configs/tiny.yaml --train-data shards/ --output-dir runs/tiny   # one CPU process

The resolved config goes to DIR/config.yaml, checkpoints to DIR/checkpoints/step-NNNNNN/, sample grids to
DIR/samples/, logs to DIR/logs/, and the final EMA model to DIR/ (`ldm-txt2img --model DIR "a prompt"`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.common import cli_main  # noqa: E402
from ldm.config import apply_overrides, from_dict, load_yaml  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="training YAML (configs/tiny.yaml, sd-v1.yaml ...)")
    p.add_argument("--train-data", default=None, help="webdataset shards: folder, glob, brace pattern, URL")
    p.add_argument("--output-dir", default=None, help="run folder (output_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps to train up to (max_steps)")
    p.add_argument("--resume", default=None, help="'latest' (the newest checkpoint in the run folder, or a fresh start "
                   "when there is none) or a checkpoint folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-5 data.batch_size=4")
    return p


def resolve_config(args):
    """YAML -> named flags -> dotted overrides -> TrainConfig (unknown keys rejected)."""
    from ldm.train.config import TrainConfig

    data = load_yaml(args.config)
    if args.train_data is not None:  # set directly: a brace pattern must not be read as YAML
        data["data"] = {**(data.get("data") or {}), "shards": args.train_data}
    if args.output_dir is not None:
        data["output_dir"] = args.output_dir
    if args.max_steps is not None:
        data["max_steps"] = args.max_steps
    return from_dict(TrainConfig, apply_overrides(data, args.overrides), where=str(args.config))


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before and after the flags
    config = resolve_config(args)
    from ldm.train.loop import train

    out = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        prompt = config.sampling.prompts[0] if config.sampling.prompts else "a photo"
        print(f'model written to {out}; try: ldm-txt2img --model {out} "{prompt}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
