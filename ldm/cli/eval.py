"""ldm-eval: CLIP score (and FID / FD_CLIP to a reference) of an image folder, or of a model over a settings sweep.

Several processes: `ldm-eval --num-processes N ...` (or `accelerate launch --num_processes N -m ldm.cli.eval ...`):
the ranks generate disjoint shares of each setting's images and their features are merged; image i's seed depends on
(--seed, i) alone, so any number of processes and any --batch-size give the same images and scores.

A sweep axis not given (--samplers, --steps, --guidance) takes the model's own sampling default (its config's `stage`
section; a cascade's per stage, as `ldm-txt2img` does), else ldm-eval's (EVAL_DEFAULTS).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m ldm.cli.eval: imported again inside the Ctrl-C guard (scripts.py)
    from ldm.cli.scripts import run_as_main

    run_as_main("ldm.cli.eval")

import argparse
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm.cli.common import (add_single_file_options, cli_main, finite_floats, launched_accelerator, layer_count,
                            parse_sampler_options)
from ldm.diffusion.sampler_registry import (
    SIGMA_SCHEDULES,
    check_sampler_options,
    check_sigmas,
    samplers_without_sigmas,
)
from ldm.errors import LdmError
from ldm.eval.clip_score import ClipModel
from ldm.eval.evaluate import Reference, check_set_size, score_folder
from ldm.eval.imagefolder import describe_sizes, image_sizes, list_images, read_metadata
from ldm.eval.inception import RESIZERS, InceptionExtractor, MissingWeightsError
from ldm.eval.precision_recall import PR_K
from ldm.eval.prompts import load_prompts
from ldm.eval.report import setting_text, write_report
from ldm.pipeline.cascade import load_cascade, model_sampling_defaults
from ldm.pipeline.fast import COMPILE_MODES, DEFAULT_MODE, compile_pipeline
from ldm.pipeline.eval_images import (check_batch_fits, clear_temporaries, generate_images, missing_images,
                                      open_setting_folder, plan_images, prompts_fingerprint, write_index)
from ldm.pipeline.generate import check_generation
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.settings import check_guidance
from ldm.pipeline.super_resolution import check_start_strength
from ldm.runtime import resolve_device, resolve_dtype
from ldm.writable import check_output_dir

# The sweep's sampler, steps and guidance for a model without its own (a `stage` section) where none are given.
EVAL_DEFAULTS = {"sampler": "euler", "steps": 30, "guidance": 7.5}
_FROM = {"command line": "given", "model": "the model's own", "ldm-eval default": "ldm-eval's default"}


def _split(values: list[str]) -> list[str]:
    """Accept both `--samplers a b` and `--samplers a,b`."""
    return [v for item in values for v in item.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-eval", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images with metadata.jsonl (file_name, text per line)")
    src.add_argument("--model", metavar="M",
                     help="model to generate with (path, id, or 'default': the bundled one), together with --prompts")
    g = p.add_argument_group("generation sweep (with --model)")
    g.add_argument("--prompts", metavar="FILE",
                   help="prompt set: .txt (one a line), .jsonl (a 'text' field), .tsv with a caption column, or "
                        "a bundled name such as ldm_eval_v1")
    own = "default: the model's own (its config's stage section; a cascade's per stage), else"
    g.add_argument("--samplers", nargs="+", default=None,
                   help=f"samplers to sweep (space or comma separated); {own} {EVAL_DEFAULTS['sampler']}")
    g.add_argument("--sampler-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a sampler option for every sampler of the sweep, repeatable: e.g. eta=0.5")
    g.add_argument("--steps", nargs="+", default=None, help=f"step counts to sweep; {own} {EVAL_DEFAULTS['steps']}")
    g.add_argument("--guidance", nargs="+", default=None,
                   help=f"guidance scales to sweep; {own} {EVAL_DEFAULTS['guidance']:g}")
    g.add_argument("--seed", type=int, default=0, help="base seed: image i uses a seed derived from (seed, i)")
    g.add_argument("--n-per-prompt", type=int, default=1)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--sigmas", default="model", choices=list(SIGMA_SCHEDULES),
                   help="the sigma schedule for every image: model (default) = the model's scheduler config; karras, "
                   "exponential, beta = diffusers' use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas=True "
                   f"(not for {', '.join(samplers_without_sigmas())})")
    g.add_argument("--clip-skip", type=layer_count, default=None, metavar="N",
                   help="diffusers' clip_skip for every image (default: the model's own layer; 1 is A1111's "
                   "'Clip skip 2')")
    g.add_argument("--dtype", default=None, help="generation dtype, e.g. float16, bfloat16")
    add_single_file_options(g, "--model")
    g.add_argument("--compile", default="auto", choices=("auto", "off", *COMPILE_MODES),
                   help=f"the fast generation path (fused q|k|v, channels_last, compiled networks): auto = {DEFAULT_MODE} "
                        "(CUDA graphs) on a GPU, off on the CPU")
    g.add_argument("--upscaler", action="append", default=[], metavar="SR",
                   help="a super-resolution stage after the model, repeatable: the cascade's final images are scored")
    g.add_argument("--aug-levels", nargs="+", default=None, metavar="LEVEL",
                   help="with --upscaler: the SR stages' noise-augmentation levels to sweep, e.g. 0,0.1,0.2")
    g.add_argument("--upscale-strengths", nargs="+", default=None, metavar="S",
                   help="with --upscaler: the SR stages' start strengths to sweep, e.g. 1,0.5,0.3 (1 = from pure "
                        "noise; s = from the upsampled image noised s of the way up, int(steps * s) steps)")
    g.add_argument("--reuse-samples", action="store_true",
                   help="score setting folders that have a metadata.jsonl as they are, generating nothing there")
    m = p.add_argument_group("metrics")
    m.add_argument("--ref", metavar="DIR|NPZ", help="reference images or statistics: adds FID (or FD_CLIP)")
    m.add_argument("--recursive", action="store_true", help="also take --ref images from subfolders")
    m.add_argument(
        "--distance",
        choices=["auto", "fid", "fd_clip"],
        default="auto",
        help="auto: FID when Inception weights are available, else Frechet distance in CLIP space",
    )
    m.add_argument("--kid", action="store_true", help="also KID (needs a folder as --ref)")
    m.add_argument("--precision-recall", action="store_true",
                   help=f"also improved precision and recall (Kynkaanniemi et al. 2019, k={PR_K}; needs a folder "
                        "as --ref)")
    m.add_argument("--resizer", choices=RESIZERS, default=RESIZERS[0],
                   help="how images reach Inception's 299x299: tf-bilinear (torch-fidelity / pytorch-fid's TF1 "
                        "resize, the default) or pil-bicubic (clean-fid's filter, rounded to 8 bits)")
    m.add_argument("--inception-weights", metavar="FILE", help="weights-inception-2015-12-05-6726825d.pth")
    m.add_argument("--clip-model", default=None,
                   help="open_clip architecture name or model config .json (default: the bundled CLIP, or ViT-B-32 "
                        "with --clip-pretrained)")
    m.add_argument(
        "--clip-pretrained",
        metavar="NAME_OR_FILE",
        help="open_clip tag (e.g. openai; downloads), local weights file, or 'none' (random, for tests); without "
             "this and --clip-model: the bundled CLIP trained on the emoji data (offline)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where report.json, index.html, tradeoff.png go")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward pass (generation mixes prompts in a batch; also feature extraction)")
    p.add_argument("--num-processes", type=int, default=1,
                   help="launch this many processes (accelerate launch: one GPU each, or CPU processes over gloo)")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--device", default=None, help="default: cuda when available")
    return p


def _given_axes(args) -> dict[str, list | None]:
    """The samplers, step counts and guidance scales given on the command line, parsed and checked; None: not given."""
    axes = {"sampler": None if args.samplers is None else _split(args.samplers), "steps": None, "guidance": None}
    if args.steps is not None:
        try:
            axes["steps"] = [int(s) for s in _split(args.steps)]
        except ValueError as e:
            raise LdmError(f"--steps takes integers: {e}") from e
    if args.guidance is not None:
        axes["guidance"] = [check_guidance(g) for g in finite_floats(args.guidance, "--guidance")]
    return axes


def _sampling_axes(given: dict, pipe) -> tuple[dict, dict]:
    """Each of sampler / steps / guidance: its values and where they come from. The command line's where given, else
    the loaded model's own (`pipe`: None only when all are given), else EVAL_DEFAULTS.

    A cascade whose stages run different values of an axis (the bundled one: 25 steps, then the upscaler's 8) gets
    them as a tuple per stage, set as the cascade's per-stage options so that every setting runs them."""
    own = model_sampling_defaults(pipe) if any(v is None for v in given.values()) else {}
    axes, sources = {}, {}
    for name, values in given.items():
        if values is not None:
            axes[name], sources[name] = values, "command line"
        elif name in own:
            axes[name], sources[name] = [own[name]], "model"
            if isinstance(own[name], tuple):
                pipe.options[f"stage_{name}"] = list(own[name])
        else:
            axes[name], sources[name] = [EVAL_DEFAULTS[name]], "ldm-eval default"
    return axes, sources


def _sr_axes(args) -> tuple[list, list]:
    """The super-resolution stages' augmentation levels and start strengths to sweep ([None]: their configs')."""
    if args.aug_levels is not None and not args.upscaler:
        raise LdmError("--aug-levels sweeps the super-resolution stages' augmentation: give them with --upscaler")
    levels = finite_floats(args.aug_levels, "--aug-levels") if args.aug_levels is not None else [None]
    for level in levels:
        if level is not None and not 0.0 <= level <= 1.0:
            raise LdmError(f"--aug-levels {level:g}: a level lies in [0, 1] (0 = the exact low-res image)")
    if args.upscale_strengths is not None and not args.upscaler:
        raise LdmError("--upscale-strengths sweeps where the super-resolution stages start: give them with --upscaler")
    strengths = [None]
    if args.upscale_strengths is not None:
        strengths = finite_floats(args.upscale_strengths, "--upscale-strengths")
        for strength in strengths:
            check_start_strength(strength, "--upscale-strengths")
    return levels, strengths


def _sweep_grid(axes: dict, levels: list, strengths: list) -> list[tuple]:
    """(sampler, steps, guidance, aug_level, upscale_strength) per setting of the sweep (a tuple per stage where a
    cascade's stages differ)."""
    return list(itertools.product(axes["sampler"], axes["steps"], axes["guidance"], levels, strengths))


def _setting_folder(args, sampler, steps, guidance, aug_level: float | None, strength: float | None) -> Path:
    name = (f"{setting_text(sampler)}-steps{setting_text(steps)}-cfg{setting_text(guidance)}"
            + (f"-aug{aug_level:g}" if aug_level is not None else "")
            + (f"-start{strength:g}" if strength is not None else "")
            + (f"-clipskip{args.clip_skip}" if args.clip_skip is not None else "")
            + (f"-{args.sigmas}" if args.sigmas != "model" else ""))
    return Path(args.out) / "samples" / name


def _model_id(model: str) -> str:
    """A model as settings.json names it: an existing path made absolute, anything else as given."""
    return str(Path(model).resolve()) if model != "default" and Path(model).exists() else model


def _sweep(args, grid, texts: list[str], device: torch.device) -> list[dict]:
    """Per setting: its folder, its settings (what settings.json pins) and its planned images; folders checked."""
    sampler_options = parse_sampler_options(args.sampler_option)
    for sampler in {s for g in grid for s in (g[0] if isinstance(g[0], tuple) else (g[0],))}:
        check_sampler_options(sampler, sampler_options)
        check_sigmas(sampler, args.sigmas)
    common = {
        "model": _model_id(args.model),
        "upscalers": [_model_id(m) for m in args.upscaler],
        "prompts_sha256": prompts_fingerprint(texts),
        "n_prompts": len(texts),
        "n_per_prompt": args.n_per_prompt,
        "base_seed": args.seed,  # each image's record holds its own seed, derived from this one and its index
        "height": args.height,
        "width": args.width,
        "negative_prompt": args.negative_prompt,
        "dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
        "sampler_options": sampler_options,
    }
    if args.clip_skip is not None:  # only when given: the settings.json of earlier runs stay as they were
        common["clip_skip"] = args.clip_skip
    single_file = {"config": args.config and str(Path(args.config).resolve()), "prediction_type": args.prediction_type,
                   "ema": None if args.ema else False}  # likewise: each only when given (other weights, another image)
    common.update({k: v for k, v in single_file.items() if v is not None})
    if args.sigmas != "model":  # likewise
        common["sigmas"] = args.sigmas
    if args.n_per_prompt < 1:
        raise LdmError(f"--n-per-prompt must be positive, got {args.n_per_prompt}")
    planned = plan_images(texts, args.n_per_prompt, args.seed)
    sweep = []
    for sampler, steps, guidance, aug_level, strength in grid:
        folder = _setting_folder(args, sampler, steps, guidance, aug_level, strength)
        settings = {**common, "sampler": sampler, "steps": steps, "guidance": guidance}
        if args.upscaler:
            settings["aug_level"] = aug_level  # None: each SR stage's own level
        if strength is not None:  # only when swept: folders of earlier sweeps keep their settings
            settings["upscale_strength"] = strength
        reuse = args.reuse_samples and (folder / "metadata.jsonl").is_file()  # scored as it is, whatever made it
        if not reuse:
            open_setting_folder(folder, settings, create=False)  # other settings in a resumed folder: refused now
        missing = [] if reuse else missing_images(folder, planned, settings, args.negative_prompt)
        # A value per stage (a tuple) is already the cascade's per-stage option (_sampling_axes): None passes it on.
        chosen = {k: None if isinstance(v, tuple) else v
                  for k, v in (("sampler", sampler), ("steps", steps), ("guidance", guidance))}
        sweep.append({"folder": folder, "settings": settings, "planned": planned, "missing": missing,
                      "generation": {**chosen,
                                     "height": args.height, "width": args.width, "sampler_options": sampler_options,
                                     "clip_skip": args.clip_skip, "sigmas": args.sigmas,
                                     **({"aug_level": aug_level} if aug_level is not None else {}),
                                     **({"upscale_strength": strength} if strength is not None else {})}})
    return sweep


def _load(args, device: torch.device):
    """The model (a cascade with --upscaler), loaded once."""
    model = None if args.model == "default" else args.model  # "default": the bundled model
    pipe = load_pipeline(model, device=str(device), dtype=args.dtype, ema=args.ema, config=args.config,
                         prediction_type=args.prediction_type)  # the single-file options describe --model alone
    return load_cascade(pipe, args.upscaler, device=str(device), dtype=args.dtype) if args.upscaler else pipe


def _checked_pipeline(args, sweep: list[dict], device: torch.device, pipe=None):
    """The model, loaded unless `pipe` is, with every setting to generate checked against it first; None when
    nothing is to be generated and the model was not needed."""
    todo = [s for s in sweep if s["missing"]]
    if not todo:
        return pipe
    if pipe is None:
        pipe = _load(args, device)
    for s in todo:
        gen = s["generation"]
        swept = {k: gen[k] for k in ("aug_level", "upscale_strength") if k in gen}
        if swept:
            pipe.check_options(**swept)
        check_generation(pipe, sampler=gen["sampler"], steps=gen["steps"], guidance=gen["guidance"],
                         height=args.height, width=args.width, sampler_options=gen["sampler_options"],
                         clip_skip=gen["clip_skip"], sigmas=gen["sigmas"])
        if "upscale_strength" in gen:  # every SR stage keeps a step to run at this strength
            pipe.settings(options={**pipe.options, **swept}, sampler=gen["sampler"], steps=gen["steps"],
                          guidance=gen["guidance"], sampler_options=gen["sampler_options"], clip_skip=gen["clip_skip"],
                          sigmas=gen["sigmas"])
        check_batch_fits(pipe, args.batch_size, height=args.height, width=args.width, guidance=gen["guidance"])
    mode = compile_mode(args.compile, device)
    if mode is not None:
        compile_pipeline(pipe, mode=mode)
    return pipe


def compile_mode(choice: str, device: torch.device) -> str | None:
    """The torch.compile mode `--compile` asks for on `device` (None: the eager path)."""
    if choice == "auto":
        return DEFAULT_MODE if device.type == "cuda" else None
    return None if choice == "off" else choice


def _generate(args, pipe, sweep: list[dict], accelerator) -> None:
    """Each setting's missing images, shared out over the processes; then its metadata.jsonl (by rank 0)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    _wait(accelerator)  # every rank has listed what is missing before any rank writes
    if rank == 0:
        for s in sweep:
            if s["missing"]:
                open_setting_folder(s["folder"], s["settings"])
                clear_temporaries(s["folder"])
    _wait(accelerator)
    for s in sweep:
        if s["missing"]:
            _wait(accelerator)  # the clock starts when every rank is ready: the slowest rank's time is the run's
            start = time.perf_counter()
            done = len(s["planned"]) - len(s["missing"])
            if rank == 0:
                print(f"generating {len(s['missing'])} images into {s['folder']}"
                      + (f" ({done} already there)" if done else "")
                      + (f" on {world} processes" if world > 1 else ""), file=sys.stderr)
            generate_images(pipe, s["missing"], s["folder"], s["generation"], s["settings"],
                            batch_size=args.batch_size, negative_prompt=args.negative_prompt, rank=rank, world=world)
            _wait(accelerator)
            seconds = time.perf_counter() - start
            s["throughput"] = {"images": len(s["missing"]), "seconds": round(seconds, 6), "processes": world,
                               "images_per_s": round(len(s["missing"]) / seconds, 6)}
            if rank == 0:
                print(f"generated {len(s['missing'])} images in {seconds:.1f} s "
                      f"({len(s['missing']) / seconds:.2f} images/s on {world} process(es))", file=sys.stderr)
        _wait(accelerator)
        if rank == 0 and (s["missing"] or not (s["folder"] / "metadata.jsonl").is_file()):
            write_index(s["folder"], s["planned"], s["settings"], args.negative_prompt)
        _wait(accelerator)


def _wait(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _launch(args, argv: list[str]) -> int:
    """Run this command again under `accelerate launch` with --num-processes processes; its exit code."""
    if args.num_processes < 1:
        raise LdmError(f"--num-processes must be positive, got {args.num_processes}")
    rest, skip = [], False
    for arg in argv:  # the same arguments, less --num-processes
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            rest.append(arg)
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    with socket.socket() as s:  # a free port: several launches on one machine must not meet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "ldm.cli.eval", *rest]
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "true"} if cpu else {})}
    print(f"launching {args.num_processes} processes: {' '.join(cmd[1:])}", file=sys.stderr)
    return subprocess.run(cmd, env=env, check=False).returncode


def _protocol(result: dict, settings: dict, ref: Reference | None, distance, clip: ClipModel, resizer: str) -> str:
    """The evaluation protocol in one line: what was measured against what, and how."""
    # every image's size from its header: a folder of mixed sizes says so
    parts = [describe_sizes(image_sizes(Path(settings["images"]) / item["file_name"] for item in result["per_image"]))]
    if ref is not None and distance is not None:
        what = "FD_CLIP" if distance is clip else "FID"
        held = f"statistics of {ref.npz.n or 'an unknown number of'} images" if ref.npz is not None \
            else f"{len(ref.images)} images"
        parts.append(f"{what} against {ref.path} ({held})")
        parts.append("features " + distance.name + ("" if distance is clip else f", resizer {resizer} to 299"))
    parts.append(f"CLIP score with {clip.name}")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> dict:
    if args.model and not args.prompts:
        raise LdmError("--model needs --prompts FILE (or a bundled set such as ldm_eval_v1)")
    if args.images and args.prompts:
        raise LdmError("--prompts is for --model; with --images the prompts come from metadata.jsonl")
    if args.images and (args.upscaler or args.aug_levels or args.upscale_strengths):
        raise LdmError("--upscaler, --aug-levels and --upscale-strengths are for --model")
    if args.kid and not args.ref:
        raise LdmError("--kid needs --ref DIR")
    if args.precision_recall and not args.ref:
        raise LdmError("--precision-recall needs --ref DIR (reference images)")
    if args.batch_size < 1:
        raise LdmError(f"--batch-size must be positive, got {args.batch_size}")
    if args.ref and not Path(args.ref).exists():  # before the model or the CLIP model loads
        raise LdmError(f"--ref {args.ref}: no such folder of reference images or .npz statistics file")
    if args.num_workers < 0:
        raise LdmError(f"--num-workers must be 0 (decode in this process) or more, got {args.num_workers}")
    out = check_output_dir(args.out)
    accelerator = launched_accelerator(args.device)
    main_process = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator else torch.device(resolve_device(args.device))
    notes = []
    # Load and check everything that can fail before generating anything: settings first, the CLIP model last.
    prompts = load_prompts(args.prompts) if args.prompts else []
    categories = {p.text: p.category for p in prompts}
    if args.images:
        # a broken metadata.jsonl fails now, not after the CLIP model loads
        n_images, what = len(read_metadata(args.images)), f"--images {args.images}"
    else:
        n_images = len(prompts) * max(args.n_per_prompt, 1)
        what = f"--prompts {args.prompts} ({len(prompts)} prompts x --n-per-prompt {args.n_per_prompt})"
    if args.ref:  # sets too small for the metrics asked: refused before any model loads, naming the set
        check_set_size(n_images, what, distance=True, precision_recall=args.precision_recall)
        if Path(args.ref).suffix != ".npz":
            check_set_size(len(list_images(args.ref, args.recursive)), f"--ref {args.ref}", distance=True,
                           precision_recall=args.precision_recall)
    if not args.images:
        given, (levels, strengths) = _given_axes(args), _sr_axes(args)
        if args.n_per_prompt < 1:
            raise LdmError(f"--n-per-prompt must be positive, got {args.n_per_prompt}")
        sampler_options = parse_sampler_options(args.sampler_option)  # eta=-1 fails before any model loads
        for sampler in given["sampler"] or []:  # and so does a mistyped sampler or option
            check_sampler_options(sampler, sampler_options)
            check_sigmas(sampler, args.sigmas)  # and --sigmas karras with ddim
        # An axis not given is the model's own: the model loads first then (otherwise only if images are missing).
        pipe = _load(args, device) if any(v is None for v in given.values()) else None
        axes, sources = _sampling_axes(given, pipe)
        if main_process:
            print("sampling: " + ", ".join(f"{name} {' '.join(setting_text(v) for v in axes[name])} "
                                           f"({_FROM[sources[name]]})" for name in axes), file=sys.stderr)
        sweep = _sweep(args, _sweep_grid(axes, levels, strengths), [p.text for p in prompts], device)
        pipe = _checked_pipeline(args, sweep, device, pipe)
    clip = ClipModel(args.clip_model, args.clip_pretrained, device=device)
    if main_process:
        print(f"CLIP: {clip.name}" + (" (the bundled one)" if clip.bundled else ""), file=sys.stderr)
    if clip.random_weights:
        notes.append("CLIP has random weights (--clip-pretrained none): CLIP scores and FD_CLIP are meaningless")
    ref = (Reference(args.ref, batch_size=args.batch_size, num_workers=args.num_workers, accelerator=accelerator,
                     keep_features=args.kid or args.precision_recall, recursive=args.recursive) if args.ref else None)
    if (args.kid or args.precision_recall) and ref.npz is not None:
        raise LdmError(f"--kid and --precision-recall need reference images; {args.ref} holds only statistics")
    distance = None
    if ref is not None:
        if args.distance == "fd_clip":
            distance = clip
        else:
            try:
                distance = InceptionExtractor(args.inception_weights, device=device, resizer=args.resizer)
            except MissingWeightsError as e:
                # Inception statistics (.npz) can only be compared with Inception features: no fallback then.
                if args.distance == "fid" or (ref.npz is not None and not ref.npz.extractor.startswith("clip:")):
                    raise
                notes.append(f"no Inception weights, reporting FD_CLIP instead of FID: the Frechet distance in the "
                             f"image space of CLIP {clip.name}, not comparable with FID ({e})")
                if main_process:
                    print(f"warning: {notes[-1]}", file=sys.stderr)
                distance = clip
    if ref is not None and ref.npz is not None:
        ref.stats(distance)  # a statistics file of another feature space fails here, not after generating
    if args.images:
        runs = [({"images": str(Path(args.images))}, Path(args.images), None)]
    else:
        _generate(args, pipe, sweep, accelerator)
        runs = [({**{k: s["settings"][k] for k in REPORTED if s["settings"].get(k) not in (None, {})},
                  "images": str(s["folder"])}, s["folder"], s.get("throughput")) for s in sweep]
    results = []
    for settings, folder, throughput in runs:
        result = score_folder(
            folder,
            clip,
            ref=ref,
            distance=distance,
            with_kid=args.kid,
            with_precision_recall=args.precision_recall,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            accelerator=accelerator,
        )
        for item in result["per_image"]:
            if "category" not in item and categories.get(item["text"]):
                item["category"] = categories[item["text"]]
        result["protocol"] = _protocol(result, settings, ref, distance, clip, args.resizer)
        # generation time between barriers (model loading and scoring excluded); None for images made before
        results.append({"settings": settings, "fid": None, "fd_clip": None, **result, "generation": throughput})
        summary = ", ".join(
            f"{k} {results[-1][k]:.4f}" for k in ("clip_score", "fid", "fd_clip") if results[-1][k] is not None
        )
        if main_process:
            print(f"{folder}: {summary}\n  protocol: {result['protocol']}", file=sys.stderr)
    cut = max(r["truncated_prompts"] for r in results)
    if cut:
        notes.append(f"{cut} prompt(s) are longer than the CLIP text context ({clip.context_length} tokens) and were "
                     "scored on their first tokens only, as OpenAI's CLIP and torchmetrics truncate them "
                     "(per_image marks them 'truncated')")
    report = {
        "clip_model": clip.describe(),
        "clip": clip.name,
        "distance": None if distance is None else ("fd_clip" if distance is clip else "fid"),
        "distance_extractor": None if distance is None else distance.name,
        "resizer": None if distance is None or distance is clip else args.resizer,
        "ref": args.ref,
        "model": args.model,
        "upscalers": args.upscaler or None,
        "prompts": args.prompts,
        # with --model: each sampling axis's values and where they came from (command line, model, ldm-eval default)
        "sampling": None if args.images else {name: {"values": axes[name], "from": sources[name]} for name in axes},
        "processes": accelerator.num_processes if accelerator else 1,
        "notes": notes,
        "runs": results,
    }
    if len(results) == 1:  # a single run's fields also at the top level
        report.update({k: v for k, v in results[0].items()})
    else:  # a sweep: the same top-level fields, as lists over the settings and one flat per-image list
        report.update({
            "settings": [r["settings"] for r in results],
            "clip_score": [r["clip_score"] for r in results],
            "fid": [r["fid"] for r in results],
            "fd_clip": [r["fd_clip"] for r in results],
            "per_image": [{**item, **{k: v for k, v in r["settings"].items() if k != "images"}}
                          for r in results for item in r["per_image"]],
        })
    if main_process:
        # the three files as one unit: a failure leaves the previous report whole, never a mix of old and new
        write_report(out, report, warning="RANDOM CLIP weights: scores are meaningless" if clip.random_weights else None)
        print(f"wrote {out / 'report.json'}, {out / 'index.html'}, {out / 'tradeoff.png'}", file=sys.stderr)
    return report


# The settings a run's report shows (settings.json holds more: the prompt fingerprint, the model path ...).
REPORTED = ("sampler", "steps", "guidance", "aug_level", "upscale_strength", "sampler_options", "clip_skip",
            "sigmas", "base_seed", "n_per_prompt", "height", "width", "negative_prompt")


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.num_processes != 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _launch(args, argv)
    run(args)
    return 0
