"""ldm-txt2img: generate images for a prompt (or a file of prompts) into a folder with metadata.jsonl."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.cli.common import cli_main, finite_float
from ldm.diffusion.sampler_registry import check_sampler_options, sampler_names
from ldm.errors import LdmError
from ldm.textfiles import read_text
from ldm.writable import check_output_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-txt2img", description=__doc__)
    p.add_argument("prompt", nargs="?", default=None, help='the prompt ("" = unconditional)')
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    p.add_argument("--model", default=None, help="a native/diffusers folder, an original .safetensors/.ckpt, or a hub id "
                   "(default: the bundled model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of {', '.join(sampler_names())}")
    p.add_argument("--sampler-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a sampler option, repeatable: e.g. eta=0.5 (ddim, euler_a, dpmpp_2m_sde), s_churn=10 (heun)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale (<= 1 disables it)")
    p.add_argument("--guidance-rescale", type=finite_float, default=0.0, help="Lin et al. 2023 rescale factor")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("outputs"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--init-image", type=Path, default=None, help="img2img: start from this image (with --strength)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="img2img / inpainting: fraction of the schedule to run, (0, 1] (default 0.8; 1.0 with --mask)")
    p.add_argument("--mask", type=Path, default=None, help="inpainting: white pixels of this image are repainted "
                   "(9-channel inpainting checkpoints use it natively, other models by masked blending)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "math"],
                   help="attention backend (xformers falls back to sdpa with a warning without a CUDA build)")
    p.add_argument("--allow-pickle", action="store_true", help="allow legacy pickled .ckpt files (trusted files only)")
    return p


def parse_sampler_options(pairs: list[str]) -> dict[str, float]:
    """`--sampler-option NAME=VALUE` arguments -> {NAME: float(VALUE)}."""
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not name.strip() or number is None:
            raise LdmError(f"--sampler-option {pair!r}: write NAME=VALUE with a number, e.g. eta=0.5")
        options[name.strip()] = number
    return options


def read_prompts(args) -> list[str]:
    prompts = []
    if args.prompts is not None:
        lines = read_text(args.prompts, "--prompts file").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
        content = [i for i, line in enumerate(lines) if line.strip()]
        blank = sum(1 for line in lines[: content[-1]] if not line.strip()) if content else 0  # trailing ones are fine
        if blank:
            print(f"note: skipped {blank} blank line(s) in {args.prompts}; for an unconditional image pass \"\" "
                  "as the prompt argument", file=sys.stderr)
        if not prompts:
            raise LdmError(f"--prompts file {args.prompts} holds no prompt")
    if args.prompt is not None:
        prompts.insert(0, args.prompt)
    if not prompts:
        raise LdmError('give a prompt (use "" for unconditional) or --prompts FILE')
    return prompts


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sampler_options = check_sampler_options(args.sampler, parse_sampler_options(args.sampler_option))
    if args.steps <= 0:
        raise LdmError(f"--steps must be a positive number of sampling steps, got {args.steps}")
    prompts = read_prompts(args)
    check_output_dir(args.out)  # before the model loads, not after the images are made

    from ldm.models.attention import set_attention_backend
    from ldm.pipeline.generate import generate_to_folder
    from ldm.pipeline.load import load_pipeline

    set_attention_backend(args.attention)

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    records = generate_to_folder(
        pipe, prompts, args.out, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
        guidance_rescale=args.guidance_rescale, seed=args.seed,
        n_per_prompt=args.n, height=args.height, width=args.width, negative_prompt=args.negative_prompt,
        init_image=args.init_image, strength=args.strength, mask_image=args.mask, sampler_options=sampler_options,
    )
    for r in records:
        print(args.out / r["file_name"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
