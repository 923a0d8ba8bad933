"""Train the KL-regularised autoencoder of latent diffusion (VAE + LPIPS + PatchGAN).

    accelerate launch tools/train_vae.py --config configs/vae-sd.yaml --train-data 'shards/{00000..00999}.tar' \\
        --output-dir runs/vae [--max-steps N] [--resume latest|PATH | --overwrite] [key.sub=value ...]
    python tools/train_vae.py --config configs/vae-tiny.yaml --train-data shards/ --output-dir runs/vae-tiny  # CPU

The resolved config goes to DIR/config.yaml, checkpoints to DIR/checkpoints/step-NNNNNN/, reconstruction grids to
DIR/samples/, logs to DIR/logs/, metrics to DIR/metrics.json, and the model to DIR/autoencoder.safetensors +
DIR/autoencoder.yaml (scale_factor measured). A diffusion config then uses
`model.pretrained.autoencoder: DIR/autoencoder.safetensors` and the YAML's contents as `model.autoencoder`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.common import cli_main  # noqa: E402
from ldm.train.run_args import resolve_run_config, run_parser  # noqa: E402


def build_parser():
    return run_parser("tools/train_vae.py", __doc__,
                      "VAE training YAML (configs/vae-tiny.yaml, vae-emoji.yaml, vae-sd.yaml)",
                      "optim.lr=1e-4 loss.disc_start=2000", val_data=True)


def resolve_config(args):
    """YAML -> named flags -> dotted overrides -> VAETrainConfig (unknown keys rejected)."""
    from ldm.train.vae_loop import VAETrainConfig

    return resolve_run_config(args, VAETrainConfig)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    config = resolve_config(args)
    from ldm.train.vae_loop import train_autoencoder

    out = train_autoencoder(config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # once, not per process
        print(f"autoencoder written to {out}/autoencoder.safetensors (+ autoencoder.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
