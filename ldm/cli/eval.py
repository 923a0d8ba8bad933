"""ldm-eval: CLIP score (and FID / FD_CLIP to a reference) of an image folder, or of a model over a settings sweep."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from ldm.atomic import atomic_path
from ldm.cli.common import cli_main, finite_floats
from ldm.errors import LdmError
from ldm.eval.clip_score import ClipModel
from ldm.eval.evaluate import Reference, score_folder
from ldm.eval.imagefolder import read_metadata
from ldm.eval.inception import InceptionExtractor, MissingWeightsError
from ldm.eval.prompts import load_prompts
from ldm.eval.report import plot_tradeoff, write_index_html, write_report_json
from ldm.pipeline.generate import check_generation, generate_to_folder
from ldm.pipeline.load import load_pipeline
from ldm.writable import check_output_dir


def _split(values: list[str]) -> list[str]:
    """Accept both `--samplers a b` and `--samplers a,b`."""
    return [v for item in values for v in item.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-eval", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images with metadata.jsonl (file_name, text per line)")
    src.add_argument("--model", metavar="M",
                     help="model to generate with (path, id, or 'default': the bundled one), together with --prompts")
    g = p.add_argument_group("generation sweep (with --model)")
    g.add_argument("--prompts", metavar="FILE", help="prompt set: .txt, .jsonl or a bundled name such as ldm_eval_v1")
    g.add_argument("--samplers", nargs="+", default=["euler"], help="samplers to sweep (space or comma separated)")
    g.add_argument("--steps", nargs="+", default=["30"], help="step counts to sweep")
    g.add_argument("--guidance", nargs="+", default=["7.5"], help="guidance scales to sweep")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n-per-prompt", type=int, default=1)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--dtype", default=None, help="generation dtype, e.g. float16, bfloat16")
    g.add_argument("--reuse-samples", action="store_true", help="score existing sample folders instead of regenerating")
    m = p.add_argument_group("metrics")
    m.add_argument("--ref", metavar="DIR|NPZ", help="reference images or statistics: adds FID (or FD_CLIP)")
    m.add_argument(
        "--distance",
        choices=["auto", "fid", "fd_clip"],
        default="auto",
        help="auto: FID when Inception weights are available, else Frechet distance in CLIP space",
    )
    m.add_argument("--kid", action="store_true", help="also KID (needs a folder as --ref)")
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
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--device", default=None, help="default: cuda when available")
    return p


def _sweep_grid(args) -> list[tuple[str, int, float]]:
    """(sampler, steps, guidance) per setting of the sweep, the numbers parsed and checked."""
    try:
        steps_list = [int(s) for s in _split(args.steps)]
    except ValueError as e:
        raise LdmError(f"--steps takes integers: {e}") from e
    guidance_list = finite_floats(args.guidance, "--guidance")
    return list(itertools.product(_split(args.samplers), steps_list, guidance_list))


def _setting_folder(args, sampler: str, steps: int, guidance: float) -> Path:
    return Path(args.out) / "samples" / f"{sampler}-steps{steps}-cfg{guidance:g}"


def _to_generate(args, grid: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """The settings whose samples are missing (all of them unless --reuse-samples)."""
    return [g for g in grid if not (args.reuse_samples and (_setting_folder(args, *g) / "metadata.jsonl").is_file())]


def _load_checked_pipeline(args, grid: list[tuple[str, int, float]]):
    """The model, loaded once, with every setting to generate checked against it first; None when none is."""
    if not _to_generate(args, grid):
        return None
    model = None if args.model == "default" else args.model  # "default": the bundled model
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    for sampler, steps, guidance in _to_generate(args, grid):
        check_generation(pipe, sampler=sampler, steps=steps, guidance=guidance,
                                  n_per_prompt=args.n_per_prompt, height=args.height, width=args.width)
    return pipe


def _generate_folder(args, pipe, texts: list[str], folder: Path, sampler: str, steps: int, guidance: float) -> None:
    """Generate one setting's images into `folder` atomically (no half-written folder survives a crash)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        generate_to_folder(
            pipe,
            texts,
            tmp,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            seed=args.seed,
            n_per_prompt=args.n_per_prompt,
            height=args.height,
            width=args.width,
            negative_prompt=args.negative_prompt,
        )


def _sweep(args, grid, pipe, texts: list[str]) -> list[tuple[dict, Path]]:
    """(settings, folder) per sampler x steps x guidance, generating what is missing."""
    runs = []
    missing = _to_generate(args, grid)
    for sampler, steps, guidance in grid:
        folder = _setting_folder(args, sampler, steps, guidance)
        if (sampler, steps, guidance) in missing:
            print(f"generating {folder}", file=sys.stderr)
            _generate_folder(args, pipe, texts, folder, sampler, steps, guidance)
        settings = {
            "sampler": sampler,
            "steps": steps,
            "guidance": guidance,
            "seed": args.seed,
            "n_per_prompt": args.n_per_prompt,
            "height": args.height,
            "width": args.width,
            "negative_prompt": args.negative_prompt,
            "images": str(folder),
        }
        runs.append((settings, folder))
    return runs


def run(args: argparse.Namespace) -> dict:
    if args.model and not args.prompts:
        raise LdmError("--model needs --prompts FILE (or a bundled set such as ldm_eval_v1)")
    if args.images and args.prompts:
        raise LdmError("--prompts is for --model; with --images the prompts come from metadata.jsonl")
    if args.kid and not args.ref:
        raise LdmError("--kid needs --ref DIR")
    out = check_output_dir(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    notes = []
    # Load and check everything that can fail before generating anything: settings first, the CLIP model last.
    prompts = load_prompts(args.prompts) if args.prompts else []
    categories = {p.text: p.category for p in prompts}
    if args.images:
        read_metadata(args.images)  # a broken metadata.jsonl fails now, not after the CLIP model loads
    else:
        grid = _sweep_grid(args)
        pipe = _load_checked_pipeline(args, grid)
    clip = ClipModel(args.clip_model, args.clip_pretrained, device=device)
    print(f"CLIP: {clip.name}" + (" (the bundled one)" if clip.bundled else ""), file=sys.stderr)
    if clip.random_weights:
        notes.append("CLIP has random weights (--clip-pretrained none): CLIP scores and FD_CLIP are meaningless")
    ref = Reference(args.ref, batch_size=args.batch_size, num_workers=args.num_workers) if args.ref else None
    if args.kid and ref.npz is not None:
        raise LdmError(f"--kid needs reference images; {args.ref} holds only statistics")
    distance = None
    if ref is not None:
        if args.distance == "fd_clip":
            distance = clip
        else:
            try:
                distance = InceptionExtractor(args.inception_weights, device=device)
            except MissingWeightsError as e:
                # Inception statistics (.npz) can only be compared with Inception features: no fallback then.
                if args.distance == "fid" or (ref.npz is not None and not ref.npz.extractor.startswith("clip:")):
                    raise
                notes.append(f"no Inception weights, reporting FD_CLIP instead of FID: the Frechet distance in the "
                             f"image space of CLIP {clip.name}, not comparable with FID ({e})")
                print(f"warning: {notes[-1]}", file=sys.stderr)
                distance = clip
    if ref is not None and ref.npz is not None:
        ref.stats(distance)  # a statistics file of another feature space fails here, not after generating
    if args.images:
        runs = [({"images": str(Path(args.images))}, Path(args.images))]
    else:
        runs = _sweep(args, grid, pipe, [p.text for p in prompts])
    results = []
    for settings, folder in runs:
        result = score_folder(
            folder,
            clip,
            ref=ref,
            distance=distance,
            with_kid=args.kid,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
        for item in result["per_image"]:
            if "category" not in item and categories.get(item["text"]):
                item["category"] = categories[item["text"]]
        results.append({"settings": settings, "fid": None, "fd_clip": None, **result})
        summary = ", ".join(
            f"{k} {results[-1][k]:.4f}" for k in ("clip_score", "fid", "fd_clip") if results[-1][k] is not None
        )
        print(f"{folder}: {summary}", file=sys.stderr)
    report = {
        "clip_model": clip.describe(),
        "clip": clip.name,
        "distance": None if distance is None else ("fd_clip" if distance is clip else "fid"),
        "distance_extractor": None if distance is None else distance.name,
        "ref": args.ref,
        "model": args.model,
        "prompts": args.prompts,
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
    write_report_json(out, report)
    write_index_html(out, report)
    plot_tradeoff(out, results, warning="RANDOM CLIP weights: scores are meaningless" if clip.random_weights else None)
    print(f"wrote {out / 'report.json'}, {out / 'index.html'}, {out / 'tradeoff.png'}", file=sys.stderr)
    return report


@cli_main
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
