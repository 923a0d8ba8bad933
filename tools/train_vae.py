"""Train the KL-regularised autoencoder of latent diffusion (VAE + LPIPS + PatchGAN).

    accelerate launch tools/train_vae.py --config configs/vae-sd.yaml --train-data 'shards/{00000..00999}.tar' \\
        --output-dir runs/vae [--max-steps N] [--resume latest|PATH] [key.sub=value ...]
    python tools/train_vae.py --config configs/vae-tiny.yaml --train-data shards/ --output-dir runs/vae-tiny  # CPU

The resolved config goes to DIR/config.yaml, checkpoints to DIR/checkpoints/step-NNNNNN/, reconstruction grids to
DIR/samples/, logs to DIR/logs/, metrics to DIR/metrics.json, and the model to DIR/autoencoder.safetensors +
DIR/autoencoder.yaml (scale_factor measured). A diffusion config then uses
`model.pretrained.autoencoder: DIR/autoencoder.safetensors` and the YAML's contents as `model.autoencoder`.
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
    p = argparse.ArgumentParser(prog="tools/train_vae.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="VAE training YAML (configs/vae-tiny.yaml, vae-emoji.yaml, vae-sd.yaml)")
    p.add_argument("--train-data", default=None, help="webdataset shards: folder, glob, brace pattern or URL (data.shards)")
    p.add_argument("--val-data", default=None, help="held-out shards for PSNR / rFID (validation.shards)")
    p.add_argument("--output-dir", default=None, help="run folder (output_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps to train up to (max_steps)")
    p.add_argument("--resume", default=None, help="'latest' (the newest checkpoint in the run folder, or a fresh start "
                   "when there is none) or a checkpoint folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 loss.disc_start=2000")
    return p


def resolve_config(args):
    """YAML -> named flags -> dotted overrides -> VAETrainConfig (unknown keys rejected)."""
    from ldm.train.vae_loop import VAETrainConfig

    data = load_yaml(args.config)
    if args.train_data is not None:  # set directly: a brace pattern must not be read as YAML
        data["data"] = {**(data.get("data") or {}), "shards": args.train_data}
    if args.val_data is not None:
        data["validation"] = {**(data.get("validation") or {}), "shards": args.val_data}
    if args.output_dir is not None:
        data["output_dir"] = args.output_dir
    if args.max_steps is not None:
        data["max_steps"] = args.max_steps
    return from_dict(VAETrainConfig, apply_overrides(data, args.overrides), where=str(args.config))


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    from ldm.train.vae_loop import train_autoencoder

    out = train_autoencoder(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # once, not per process
        print(f"autoencoder written to {out}/autoencoder.safetensors (+ autoencoder.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
