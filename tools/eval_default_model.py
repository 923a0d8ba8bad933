"""Generate a prompt set at several guidance scales in batches, and score it with a CLIP (the bundled one by default).

    python tools/eval_default_model.py generate --model M --prompts P.txt --guidance 1 3 5 7 --out DIR
    python tools/eval_default_model.py score --images DIR/cfg5 [DIR/cfg7 ...] --ref REAL_DIR --out report.json
    python tools/eval_default_model.py reconstruct --images REAL_DIR --out DIR/ae   # then ldm-eval --images DIR/ae
        --ref REAL_DIR --distance fd_clip: the autoencoder's reconstruction distance in CLIP space

generate: image i of the set uses seed `seed + i` and the first DPM-Solver++(2M) plan of `steps` steps, as
`pipe(prompt, seed=seed + i, steps=steps, guidance=g)` does (batching changes only rounding); each guidance scale
gets `DIR/cfg<g>/` with metadata.jsonl, which `ldm-eval --images` reads.
score: per folder the CLIP score with the images' own prompts and with the prompts shuffled (a derangement: the gap
is what the prompt adds), top-1/top-5 retrieval of each image's own prompt among the folder's distinct prompts, and
the Frechet distance in the CLIP's image space to `--ref` (not FID: no Inception network is involved); each run
records the guidance scale its folder's metadata.jsonl names (tools/plot_default_model.py plots against it).
reconstruct: each image through the model's autoencoder (posterior mode, then decode) into `--out` with
metadata.jsonl (the source folder's captions where it has them); prints the mean per-image PSNR on 8-bit RGB.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.atomic import atomic_path, atomic_write_text  # noqa: E402
from ldm.cli.common import cli_main  # noqa: E402
from ldm.textfiles import read_jsonl  # noqa: E402


@torch.no_grad()
def generate_batch(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, sampler: str = "dpmpp_2m"):
    """One image per (prompt, seed), all in one batch: the noise of each is its own seeded CPU draw."""
    from ldm.diffusion.guidance import cfg
    from ldm.diffusion.plans import sampling_plan
    from ldm.diffusion.sampler_registry import run_sampler
    from ldm.pipeline.images import to_pil

    size = pipe.default_size // pipe.autoencoder.downsample_factor
    shape = (1, pipe.autoencoder.latent_channels, size, size)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=pipe.dtype)
                       for s in seeds]).to(pipe.device, pipe.stage.sample_dtype)  # x in float32, as pipe() keeps it
    plan = sampling_plan(pipe.schedule_config, sampler, steps)
    cond = pipe.encode_prompts(prompts)
    denoiser = plan.with_network_timesteps(pipe.denoiser)  # the timesteps diffusers' network sees, as pipe() does
    if guidance > 1.0:
        uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in pipe.encode_prompts([""]).items()}
        cond, denoiser = {"cond": cond, "uncond": uncond}, cfg(denoiser, guidance)
    x = run_sampler(sampler, denoiser, noise * plan.init_noise_scale, plan, cond,
                    generator=torch.Generator("cpu").manual_seed(seeds[0]))
    return to_pil(pipe.autoencoder.decode_latents((x * plan.final_scale).to(pipe.dtype)))


def generate(args) -> None:
    from ldm.eval.prompts import load_prompts
    from ldm.pipeline.load import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    texts = [p.text for p in load_prompts(args.prompts)][: args.limit]
    for g in args.guidance:
        folder = Path(args.out) / f"cfg{g:g}"
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            rows = []
            for start in range(0, len(texts), args.batch_size):
                chunk = texts[start:start + args.batch_size]
                seeds = [args.seed + start + i for i in range(len(chunk))]
                for i, image in enumerate(generate_batch(pipe, chunk, seeds, args.steps, g)):
                    name = f"{start + i:05d}.png"
                    image.save(tmp / name)
                    rows.append({"file_name": name, "text": chunk[i], "seed": seeds[i], "guidance": g})
            (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{folder}: {len(texts)} images")


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A random permutation of range(n) that moves every element (n >= 2)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if n < 2 or bool((perm != torch.arange(n)).all()):
            return perm


def guidance_of(folder) -> dict:
    """`{"guidance": g}` when every line of the folder's metadata.jsonl names the same scale (as `generate` writes)."""
    values = {row.get("guidance") for _, row in read_jsonl(Path(folder) / "metadata.jsonl") if isinstance(row, dict)}
    return {"guidance": values.pop()} if len(values) == 1 and isinstance(next(iter(values)), (int, float)) else {}


@torch.no_grad()
def score(args) -> None:
    from ldm.eval.clip_score import ClipModel, clip_score
    from ldm.eval.features import compute_features
    from ldm.eval.frechet import fid
    from ldm.eval.imagefolder import list_images, read_metadata
    from ldm.eval.retrieval import prompt_retrieval

    clip = ClipModel(args.clip_model, args.clip_pretrained) if args.clip_model else ClipModel.bundled()
    ref = None
    if args.ref:
        ref = compute_features(list_images(Path(args.ref)), clip, keep=False, progress=False).moments.to_stats(clip.name)
    report = {"clip": clip.describe(), "runs": []}
    for folder in args.images:
        rows = read_metadata(folder)
        img = compute_features([r.path for r in rows], clip, keep=True, progress=False).values.float()
        texts = [r.text for r in rows]
        distinct = sorted(set(texts))
        txt = clip.encode_texts(distinct)
        index = torch.tensor([distinct.index(t) for t in texts])
        own = clip_score(img, txt[index])
        shuffled = clip_score(img, txt[index[derangement(len(rows))]])
        run = {"images": str(folder), **guidance_of(folder), "n": len(rows), "prompts": len(distinct),
               "clip_score": float(own.mean()), "clip_score_shuffled": float(shuffled.mean()),
               **{f"retrieval_{k}": v for k, v in prompt_retrieval(img, txt, index).items()}}
        if ref is not None:
            from ldm.eval.features import compute_features as cf

            stats = cf([r.path for r in rows], clip, keep=False, progress=False).moments.to_stats(clip.name)
            run["fd_clip"] = fid(stats, ref)
        report["runs"].append(run)
        print(json.dumps(run))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2))


@torch.no_grad()
def reconstruct(args) -> None:
    import numpy as np

    from ldm.errors import LdmError
    from ldm.eval.imagefolder import list_images, load_rgb
    from ldm.pipeline.images import from_pil, to_pil
    from ldm.pipeline.load import load_pipeline

    files = list_images(args.images)
    if not files:
        raise LdmError(f"--images {args.images}: no images there")
    meta = Path(args.images) / "metadata.jsonl"
    captions = ({row["file_name"]: row.get("text", "") for _, row in read_jsonl(meta) if isinstance(row, dict)}
                if meta.is_file() else {})
    codec = load_pipeline(args.model, device=args.device).codec
    psnrs, rows = [], []
    with atomic_path(Path(args.out)) as tmp:
        tmp.mkdir(parents=True)
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            real = [load_rgb(f) for f in chunk]
            x = from_pil(real).to(next(codec.parameters()).device)
            for f, a, b in zip(chunk, real, to_pil(codec.decode(codec.encode(x)))):
                mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
                psnrs.append(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))
                b.save(tmp / f.name)
                rows.append({"file_name": f.name, "text": captions.get(f.name, ""), "psnr": round(psnrs[-1], 4)})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"images": len(rows), "psnr": float(np.mean(psnrs)), "out": str(args.out)}))


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/eval_default_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    g.add_argument("--prompts", required=True)
    g.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--device", default=None)
    g.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("--images", nargs="+", required=True, help="folders with metadata.jsonl")
    s.add_argument("--ref", default=None, help="real images for the Frechet distance in CLIP space")
    s.add_argument("--clip-model", default=None, help="open_clip name or config .json (default: the bundled CLIP)")
    s.add_argument("--clip-pretrained", default=None)
    s.add_argument("--out", default=None, help="report .json")
    r = sub.add_parser("reconstruct")
    r.add_argument("--images", required=True, help="a folder of real images")
    r.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--device", default=None)
    r.add_argument("--out", required=True)
    args = p.parse_args(argv)
    {"generate": generate, "score": score, "reconstruct": reconstruct}[args.action](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
