"""ldm-txt2img: generate images for a prompt (or a file of prompts) into a folder with metadata.jsonl."""
from __future__ import annotations

if __name__ == "__main__":  # python -m ldm.cli.txt2img: imported again inside the Ctrl-C guard (scripts.py)
    from ldm.cli.scripts import run_as_main

    run_as_main("ldm.cli.txt2img")

import argparse
import sys
from pathlib import Path

from ldm.cli.common import add_single_file_options, cli_main, finite_float, layer_count, parse_sampler_options
from ldm.diffusion.sampler_registry import (
    ADAPTIVE_SAMPLERS,
    SIGMA_SCHEDULES,
    check_sampler_options,
    check_sigmas,
    sampler_names,
    samplers_without_sigmas,
)
from ldm.errors import LdmError
from ldm.models.attention import set_attention_backend
from ldm.pipeline.cascade import load_cascade, use_model_defaults
from ldm.pipeline.fast import COMPILE_MODES, DEFAULT_MODE, compile_pipeline
from ldm.pipeline.generate import generate_to_folder
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.refiner import HIGH_NOISE_FRAC, ExpertEnsemble
from ldm.pipeline.settings import check_guidance, check_seed
from ldm.runtime import resolve_device
from ldm.textfiles import read_text
from ldm.writable import check_output_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-txt2img", description=__doc__)
    p.add_argument("prompt", nargs="?", default=None, help='the prompt ("" = unconditional)')
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    p.add_argument("--model", default=None, help="a native/diffusers folder, an original .safetensors/.ckpt, or a hub id "
                   "(default: the bundled model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(sampler_names())} (default: the model's own, "
                   "e.g. ddpm for DeepFloyd IF, else dpmpp_2m)")
    p.add_argument("--sampler-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a sampler option, repeatable: e.g. eta=0.5 (ddim, euler_a, dpmpp_2m_sde), s_churn=10 (heun), "
                   "rtol=0.01 atol=0.001 (dpm_adaptive's error tolerances)")
    p.add_argument("--sigmas", default="model", choices=list(SIGMA_SCHEDULES),
                   help="the sigma schedule: model (default) = the model's scheduler config; karras = Karras et al.'s "
                   "sigmas, as diffusers' use_karras_sigmas=True (A1111's 'DPM++ 2M Karras' is --sampler dpmpp_2m "
                   "--sigmas karras); exponential = log-spaced sigmas (use_exponential_sigmas=True); beta = "
                   "Beta(0.6, 0.6)-spaced sigmas (use_beta_sigmas=True); none of them for "
                   f"{', '.join(samplers_without_sigmas())} (their diffusers schedulers lack these keys, or they walk "
                   "the model's whole sigma range)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own: DeepFloyd IF "
                   "100, its stage II 50, the x4 upscaler 75, else 30; in a cascade each stage's); dpm_fast: its "
                   "number of model evaluations; dpm_adaptive: unused but for --strength (rtol / atol set its work)")
    p.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale, 0 or more "
                   "(<= 1 disables it; default: the model's own: DeepFloyd IF 7, its stage II 4, the x4 upscaler 9, "
                   "else 7.5)")
    p.add_argument("--guidance-rescale", type=finite_float, default=0.0, help="Lin et al. 2023 rescale factor")
    p.add_argument("--clip-skip", type=layer_count, default=None, metavar="N",
                   help="diffusers' clip_skip: read the CLIP text encoder N layers before the model's own, for the "
                   "prompt and the negative prompt (default: the model's own layer; 1 is A1111's 'Clip skip 2'; "
                   "SDXL counts on from its penultimate layer, SD-2 from its own penultimate one)")
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
    cascade = p.add_argument_group("cascade (Imagen: a base model, then super-resolution stages)")
    cascade.add_argument("--upscaler", action="append", default=[], metavar="MODEL",
                         help="a super-resolution stage run after the model, repeatable (--upscaler SR256 "
                         "--upscaler SR1024)")
    cascade.add_argument("--aug-level", type=finite_float, default=None,
                         help="noise-conditioning augmentation level of the SR stages, in [0, 1] (default: each "
                         "stage's config)")
    cascade.add_argument("--upscale-strength", type=finite_float, default=None, metavar="S",
                         help="where the SR stages start, in (0, 1]: 1 = from pure noise (Imagen), s < 1 = from the "
                         "upsampled image noised s of the way up, running int(steps * s) steps (SDEdit; default: "
                         "each stage's stage.start_strength)")
    cascade.add_argument("--noise-level", type=int, default=None,
                         help="the x4 upscaler's noise level on its low-res input, 0..350 (default: its config's, 20)")
    cascade.add_argument("--stage-steps", type=_stage_list(int), default=None, metavar="N,N",
                         help="sampling steps per stage, e.g. 50,25 (default: --steps)")
    cascade.add_argument("--stage-guidance", type=_stage_list(float), default=None, metavar="G,G",
                         help="guidance per stage, e.g. 7,4 (default: --guidance)")
    cascade.add_argument("--stage-sampler", type=_stage_list(str), default=None, metavar="S,S",
                         help="sampler per stage, e.g. ddim,euler (default: --sampler)")
    cascade.add_argument("--start-stage", type=int, default=1,
                         help="upscale --init-image starting at this stage (2 = the first upscaler)")
    sdxl = p.add_argument_group("SDXL (micro-conditioning, the refiner, a replacement VAE)")
    sdxl.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="the size the model is told the training image had (default: the image size)")
    sdxl.add_argument("--crops-coords-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                      help="the crop the model is told was taken (default: 0 0, an uncropped look)")
    sdxl.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="base model: the target size (default: the image size)")
    sdxl.add_argument("--aesthetic-score", type=finite_float, default=None, help="refiner: default 6.0")
    sdxl.add_argument("--negative-aesthetic-score", type=finite_float, default=None, help="refiner: default 2.5")
    sdxl.add_argument("--refiner", metavar="MODEL", default=None,
                      help="an SDXL refiner that runs the low-noise steps after the model (ensemble of experts)")
    sdxl.add_argument("--high-noise-frac", type=finite_float, default=None,
                      help=f"with --refiner: the fraction of the schedule the base model runs (default "
                      f"{HIGH_NOISE_FRAC}; diffusers' denoising_end)")
    sdxl.add_argument("--vae", type=Path, default=None,
                      help="a VAE (.safetensors or a diffusers vae/ folder) in place of the model's, e.g. a fixed-fp16 "
                      "SDXL VAE that decodes in fp16 (the SDXL VAE otherwise decodes in fp32)")
    p.add_argument("--dynamic-threshold", type=finite_float, default=None, metavar="P",
                   help="dynamic thresholding percentile, e.g. 0.995 (default: on for pixel models at their "
                   "config's percentile, off for latent models; 0 = off)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "math"],
                   help="attention backend (xformers falls back to sdpa with a warning without a CUDA build)")
    p.add_argument("--compile", nargs="?", const=DEFAULT_MODE, default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="the fast path: fused q|k|v, NHWC, U-Net and VAE decoder compiled (MODE default "
                        f"{DEFAULT_MODE}: CUDA graphs); the first image pays the compile time")
    p.add_argument("--fp8", action="store_true",
                   help="the U-Net's transformer linears multiply in FP8 (Ada/Hopper GPUs; opt-in: images differ "
                        "slightly from bf16's, and at SD sizes it measured slower, docs/benchmarks/README.md); "
                        "without --compile it also fuses q|k|v and stores the networks NHWC, as the fast path does")
    p.add_argument("--group-norm-kernel", action="store_true",
                   help="the U-Net's GroupNorms (and the SiLU after them) through a Triton kernel (CUDA with "
                        "triton, NHWC, half precision; opt-in: on an H200 it measured 3%% slower compiled and 37%% "
                        "slower eagerly (its first design), docs/benchmarks/README.md run 10); "
                        "without --compile it also fuses q|k|v and stores the networks NHWC, as the fast path does")
    p.add_argument("--allow-pickle", action="store_true", help="allow legacy pickled .ckpt files (trusted files only)")
    add_single_file_options(p, "--model")
    return p


def _stage_list(kind):
    """An argparse type: a comma-separated value per stage."""

    def parse(text: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",")]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: give one {kind.__name__} per stage, comma-separated") from e

    return parse


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


MICRO_ARGS = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score")


def micro_conditioning(args, pipe) -> dict:
    """The --original-size ... --negative-aesthetic-score values given, checked against what the model takes."""
    given = {k: getattr(args, k) for k in MICRO_ARGS if getattr(args, k) is not None}
    models = [pipe.base, pipe.refiner] if isinstance(pipe, ExpertEnsemble) else [pipe]
    names = {n for m in models for n in getattr(m.unet.config, "micro_conditioning", ())}
    unused = [k for k in given if k.removeprefix("negative_") not in names]
    if unused:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unused)
        takes = f"takes {', '.join(sorted(names))}" if names else "has no micro-conditioning (SDXL models have)"
        raise LdmError(f"{flags}: the model {takes}")
    return given


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sampler_options = parse_sampler_options(args.sampler_option)  # eta=-1 fails before the model loads
    if args.sampler is not None:  # and so does a typo
        check_sampler_options(args.sampler, sampler_options)
        check_sigmas(args.sampler, args.sigmas)  # and --sigmas karras with ddim
    for sampler in args.stage_sampler or []:
        check_sigmas(sampler, args.sigmas)
    for option, scales in (("--guidance", [args.guidance]), ("--stage-guidance", args.stage_guidance or [])):
        for scale in scales:
            if scale is not None:
                check_guidance(scale, option)  # a negative (or, per stage, non-finite) scale too
    prompts = read_prompts(args)
    check_seed(args.seed, len(prompts))
    check_output_dir(args.out)  # before the model loads, not after the images are made
    resolve_device(args.device)  # a mistyped --device too

    set_attention_backend(args.attention)

    if args.high_noise_frac is not None and args.refiner is None:
        raise LdmError("--high-noise-frac: give the refiner with --refiner")
    if args.refiner is not None and args.upscaler:
        raise LdmError("--refiner and --upscaler: an SDXL ensemble and a pixel cascade do not combine")
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                         vae=args.vae, ema=args.ema, config=args.config, prediction_type=args.prediction_type)
    if args.refiner is not None:
        refiner = load_pipeline(args.refiner, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                vae=args.vae, ema=args.ema)
        frac = HIGH_NOISE_FRAC if args.high_noise_frac is None else args.high_noise_frac
        pipe = ExpertEnsemble(pipe, refiner, frac)
    micro = micro_conditioning(args, pipe)
    cascade_options = dict(stage_steps=args.stage_steps, stage_guidance=args.stage_guidance,
                           stage_sampler=args.stage_sampler, aug_level=args.aug_level, start_stage=args.start_stage,
                           upscale_strength=args.upscale_strength)
    noise_level = args.noise_level
    if args.upscaler:
        pipe = load_cascade(pipe, args.upscaler, device=args.device, dtype=args.dtype,
                            allow_pickle=args.allow_pickle, noise_level=noise_level, **cascade_options)
        noise_level = None  # the cascade holds it
    else:
        given = [f"--{k.replace('_', '-')}" for k, v in cascade_options.items()
                 if v is not None and (k, v) != ("start_stage", 1)]
        if given:
            raise LdmError(f"{', '.join(given)}: cascade options; give the super-resolution stages with --upscaler")
    chosen = use_model_defaults(pipe, sampler=args.sampler, steps=args.steps, guidance=args.guidance)
    if args.steps is not None and chosen["sampler"] in ADAPTIVE_SAMPLERS and args.init_image is None:
        print(f"note: --steps {args.steps} does not set {chosen['sampler']}'s work: it sizes its own steps to its error "
              "tolerances (--sampler-option rtol=... atol=...); --steps only places --strength's start",
              file=sys.stderr)
    if len(pipe.stages) == 1:  # a cascade checks each stage's sampler against the options itself
        check_sampler_options(chosen["sampler"], sampler_options)
    if args.compile or args.fp8 or args.group_norm_kernel:
        compile_pipeline(pipe, mode=args.compile, fp8=args.fp8, group_norm_kernel=args.group_norm_kernel)
    records = generate_to_folder(
        pipe, prompts, args.out, sampler=chosen["sampler"], steps=chosen["steps"], guidance=chosen["guidance"],
        guidance_rescale=args.guidance_rescale, seed=args.seed,
        n_per_prompt=args.n, height=args.height, width=args.width, negative_prompt=args.negative_prompt,
        init_image=args.init_image, strength=args.strength, mask_image=args.mask, sampler_options=sampler_options,
        dynamic_threshold=args.dynamic_threshold, noise_level=noise_level, micro_conditioning=micro,
        clip_skip=args.clip_skip, sigmas=args.sigmas,
    )
    for r in records:
        print(args.out / r["file_name"])
    return 0
