"""Train a small CLIP contrastively on captioned webdataset shards (an open_clip model definition).

    accelerate launch tools/train_clip.py --config configs/clip-emoji.yaml --train-data 'shards/{00000..00007}.tar' \\
        --val-data shards/val.tar --output-dir runs/clip-emoji [--max-steps N] [--resume latest|PATH | --overwrite] [key=value ...]

The resolved config goes to DIR/config.yaml, checkpoints to DIR/checkpoints/step-NNNNNN/, logs to DIR/logs/,
held-out retrieval (top-1/top-5, text->image and image->text) to DIR/metrics.json, and the model to
DIR/<name>.json + DIR/<name>.safetensors, which open_clip loads:
`open_clip.add_model_config('DIR/<name>.json'); open_clip.create_model('<name>', pretrained='DIR/<name>.safetensors')`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.common import cli_main  # noqa: E402
from ldm.train.run_args import resolve_run_config, run_parser  # noqa: E402


def build_parser():
    return run_parser("tools/train_clip.py", __doc__, "CLIP training YAML (configs/clip-emoji.yaml)",
                      "optim.lr=1e-3 data.batch_size=512", val_data=True)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from ldm.train.clip_loop import ClipTrainConfig, train_clip

    config = resolve_run_config(args, ClipTrainConfig)
    out = train_clip(config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"CLIP written to {out}/{config.name}.safetensors (+ {config.name}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
