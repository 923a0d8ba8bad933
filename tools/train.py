"""Train a text-to-image diffusion model: a latent model, or one pixel cascade stage (configs/imagen-*.yaml).

    accelerate launch tools/train.py --config configs/sd-v1.yaml --train-data 'shards/{00000..00999}.tar' \\
        --output-dir runs/sd1 [--max-steps N] [--resume latest|PATH | --overwrite] [key.sub=value ...]
    python tools/train.py --config configs/tiny.yaml --train-data shards/ --output-dir runs/tiny   # one CPU process

The resolved config goes to DIR/train_config.yaml, checkpoints to DIR/checkpoints/step-NNNNNN/, sample grids to
DIR/samples/, logs to DIR/logs/, and the final model (its EMA weights; the trained ones with ema.enabled=false) to
DIR/ in the native format (config.yaml + safetensors: `ldm-txt2img --model DIR "a prompt"`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.common import cli_main  # noqa: E402
from ldm.train.run_args import resolve_run_config, run_parser  # noqa: E402


def build_parser():
    p = run_parser("tools/train.py", __doc__, "training YAML (configs/tiny.yaml, sd-v1.yaml ...)",
                   "optim.lr=5e-5 data.batch_size=4")
    p.add_argument("--no-compile", action="store_true",
                   help="train eagerly (compile=false); by default the U-Net step is compiled on GPUs")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before and after the flags
    from ldm.train.config import TrainConfig
    from ldm.train.loop import train

    if args.no_compile:
        args.overrides.append("compile=false")
    config = resolve_run_config(args, TrainConfig)
    out = train(config, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        prompt = config.sampling.prompts[0] if config.sampling.prompts else "a photo"
        if (config.model.stage or {}).get("low_res_size") is not None:  # an SR stage upscales a base model's images
            print(f'model written to {out}; try: ldm-txt2img --model BASE --upscaler {out} "{prompt}"')
        elif config.model.latent_upscale is not None:  # the x4 upscaler: alone it needs the image to upscale
            print(f'model written to {out}; try: ldm-txt2img --model {out} --init-image LOW_RES.png "{prompt}" '
                  f'(or --model BASE --upscaler {out})')
        else:
            print(f'model written to {out}; try: ldm-txt2img --model {out} "{prompt}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
