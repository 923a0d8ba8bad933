"""Make the bundled upscaler from a trained SR stage's run folder: fp16 U-Net, the text tower shared with the CLIP.

    python tools/bundle_upscaler.py runs/sr-emoji ldm/assets/default-upscaler \
        --text-tower ../clip-emoji/clip-emoji.safetensors \
        --set stage.start_strength=0.5 stage.steps=8 stage.guidance=1.0

The folder gets `config.yaml` (the run's, with `text_encoder.pretrained` naming the bundled CLIP, relative to the
folder, so the cascade's stages share one text encoder and no copy travels; `--set` overrides, e.g. the sampling
defaults measured on held-out images), `unet.safetensors` in fp16 and a `manifest.json` over it. It is loaded back and its text encoder compared with the bundled default model's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.atomic import atomic_path  # noqa: E402
from ldm.cli.common import cli_main  # noqa: E402
from ldm.config import apply_overrides, load_yaml, save_yaml  # noqa: E402
from ldm.errors import LdmError  # noqa: E402
from ldm.io.checkpoint import read_state_dict, write_safetensors  # noqa: E402
from ldm.io.formats import load_model  # noqa: E402
from ldm.io.native_format import MANIFEST, weights_file, write_manifest  # noqa: E402


def bundle(run: Path, out: Path, text_tower: str, overrides: list[str] = ()) -> int | None:
    """Write the bundle; returns the step it was exported at."""
    config = apply_overrides(load_yaml(run / "config.yaml"), list(overrides))
    if (config.get("stage") or {}).get("low_res_size") is None:
        raise LdmError(f"{run / 'config.yaml'} is not a super-resolution stage (no stage.low_res_size)")
    config["text_encoder"]["pretrained"] = text_tower
    manifest = run / MANIFEST
    step = json.loads(manifest.read_text()).get("step") if manifest.is_file() else None
    unet = {k: v.to(torch.float16).contiguous() for k, v in read_state_dict(run / weights_file("unet")).items()}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_yaml(config, tmp / "config.yaml")
        write_safetensors(unet, tmp / weights_file("unet"), metadata={"format": "pt"})
        write_manifest(tmp, step)
    return step


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/bundle_upscaler.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the SR stage's exported folder (config.yaml, unet.safetensors)")
    p.add_argument("out", type=Path, help="the bundle folder to write (must not exist)")
    p.add_argument("--text-tower", default="../clip-emoji/clip-emoji.safetensors",
                   help="the open_clip CLIP whose text tower the stage was trained on, relative to OUT")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. stage.start_strength=0.5 stage.steps=8 (the stage's sampling defaults)")
    args = p.parse_args(argv)
    if args.out.exists():
        raise LdmError(f"{args.out} exists: remove it first (a bundle is written whole)")
    step = bundle(args.run, args.out, args.text_tower, args.set)
    parts = load_model(str(args.out))  # checks the manifest, the stage section's values and finds the text tower
    size = (args.out / weights_file("unet")).stat().st_size
    print(f"{args.out}: step {step}, unet {size / 1e6:.2f} MB, text encoder {parts.config['text_encoder']['pretrained']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
