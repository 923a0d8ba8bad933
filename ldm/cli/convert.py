"""ldm-convert: Stable Diffusion weights between the original single file, diffusers folders and the native format."""
from __future__ import annotations

if __name__ == "__main__":  # python -m ldm.cli.convert: imported again inside the Ctrl-C guard (scripts.py)
    from ldm.cli.scripts import run_as_main

    run_as_main("ldm.cli.convert")

import argparse
import sys
from pathlib import Path

from ldm.cli.common import add_single_file_options, cli_main
from ldm.errors import LdmError
from ldm.io.formats import load_model, save
from ldm.writable import check_output_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-convert",
        description="Convert Stable Diffusion weights. SRC: an original .safetensors/.ckpt, a diffusers pipeline "
                    "folder, a native ldm folder, or a Hugging Face Hub id (needs network access).")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="output: a *.safetensors file for --to original, else a folder")
    p.add_argument("--to", required=True, choices=("original", "diffusers", "native"), help="output format")
    add_single_file_options(p, "SRC")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt files that need arbitrary Python objects; only for files you trust")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="cast the weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def run(args: argparse.Namespace) -> list[str]:
    """Convert as `args` say; returns the notes to show."""
    dst = Path(args.dst)
    if args.to == "original" and dst.suffix.lower() != ".safetensors":
        raise LdmError(f"{dst}: --to original writes one .safetensors file; name DST *.safetensors")
    check_output_path(dst, "DST", folder=args.to != "original", overwrite=args.overwrite)  # before loading SRC
    components = load_model(args.src, dtype=args.dtype, allow_pickle=args.allow_pickle, config=args.config,
                            prediction_type=args.prediction_type, ema=args.ema)
    save(components, dst, args.to)
    own = {k: v for k, v in (components.config.get("stage") or {}).items()
           if k in ("steps", "guidance", "sampler") and v is not None}
    if_diffusers = args.to == "diffusers" and components.config.get("unet", {}).get("type") == "if_unet"
    if own and args.to != "native" and not if_diffusers:  # an IF folder keeps them (ldm/io/if_format.py)
        return [*components.notes, f"the model's own sampling defaults ({', '.join(f'{k} {v}' for k, v in own.items())}) "
                f"have no place in the {args.to} format and were not written: pass them as --steps / --guidance / "
                "--sampler, or convert --to native"]
    return components.notes


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notes = run(args)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.dst} ({args.to})")
    return 0
