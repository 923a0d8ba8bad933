"""Evaluate a 64 -> 256 super-resolution stage against bicubic upsampling on held-out images (docs/imagen.md).

    python tools/eval_sr.py inputs 'data/emoji256/validation/*.tar' --out eval/sr          # truth/, low/, captions
    python tools/eval_sr.py upscale --model ldm/assets/default-upscaler --inputs eval/sr --out eval/sr/sr-0.1
    python tools/eval_sr.py upscale --model ldm/assets/default-upscaler --inputs eval/sr --out eval/sr/s0.3 --strength 0.3
    python tools/eval_sr.py upscale --bicubic --inputs eval/sr --out eval/sr/bicubic
    python tools/eval_sr.py score --truth eval/sr/truth --images eval/sr/bicubic eval/sr/sr-0.1 --json eval/sr/scores.json
    python tools/eval_sr.py figure --inputs eval/sr --images eval/sr/bicubic eval/sr/sr-0.1 --out docs/images/x.png

The low-res input is the held-out 256 px image downsampled exactly as training does (`downsample`, antialiased
bicubic), rounded to 8 bits like a saved 64 px image. Scores, per set of upscaled images:
- PSNR (dB) against the 256 px truth, per image on 8-bit RGB, averaged;
- FD_CLIP-tiles: the Frechet distance between the bundled CLIP's image embeddings of the 64 px tiles (16 per
  image) of the upscaled and of the true images. The CLIP sees 64 px, so each tile shows it 256 px detail
  (edges, blur) at its own scale. This is not FID: no Inception network is involved and its scale is not FID's.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.atomic import atomic_write_text  # noqa: E402
from ldm.cli.common import cli_main, finite_float  # noqa: E402
from ldm.diffusion.noise_augmentation import downsample, upsample  # noqa: E402
from ldm.errors import LdmError  # noqa: E402
from ldm.eval.clip_score import ClipModel  # noqa: E402
from ldm.eval.frechet import frechet_distance, stats_from_features  # noqa: E402
from ldm.pipeline.images import from_pil, to_pil  # noqa: E402
from ldm.pipeline.load import load_pipeline  # noqa: E402
from ldm.pipeline.sampling import sample  # noqa: E402
from ldm.pipeline.settings import GenerationSettings  # noqa: E402
from ldm.pipeline.super_resolution import SuperResolution, check_start_strength, check_steps_left  # noqa: E402

LOW, TRUTH, CAPTIONS = "low", "truth", "captions.jsonl"
TILE = 64


def write_inputs(pattern: str, out: Path, low_size: int) -> int:
    """truth/KEY.png (the held-out images), low/KEY.png (their low-res inputs) and captions.jsonl."""
    (out / TRUTH).mkdir(parents=True, exist_ok=True)
    (out / LOW).mkdir(parents=True, exist_ok=True)
    rows = []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                key, _, ext = name.partition(".")
                if ext != "png":
                    continue
                truth = Image.open(tar.extractfile(members[name])).convert("RGB")
                truth.save(out / TRUTH / f"{key}.png")
                to_pil(downsample(from_pil(truth), low_size))[0].save(out / LOW / f"{key}.png")
                rows.append({"key": key, "caption": tar.extractfile(members[f"{key}.txt"]).read().decode()})
    if not rows:
        raise LdmError(f"no .png samples in {pattern}")
    atomic_write_text(out / CAPTIONS, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def read_captions(inputs: Path) -> list[dict]:
    path = inputs / CAPTIONS
    if not path.is_file():
        raise LdmError(f"{path} is missing: make the inputs with `tools/eval_sr.py inputs`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def upscale(args: argparse.Namespace) -> int:
    """Upscale every low/KEY.png into out/KEY.png, with the model (batched) or bicubic."""
    rows = read_captions(args.inputs)
    if args.strength is not None:
        check_start_strength(args.strength, "--strength")
    pipe = None if args.bicubic else load_pipeline(args.model, device=args.device, dtype=args.dtype)
    if pipe is not None:
        strength = pipe.stage.stage_config.start_strength if args.strength is None else args.strength
        steps = args.steps if args.steps is not None else (pipe.stage.stage_config.steps or 20)
        check_steps_left(strength, steps, f"--model {args.model}", "--strength")
    args.out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start: start + args.batch_size]
        low = from_pil([Image.open(args.inputs / LOW / f"{r['key']}.png") for r in batch])
        if pipe is None:
            images = upsample(low, args.size)
        else:
            stage = pipe.stage
            level = stage.stage_config.aug_level if args.aug_level is None else args.aug_level
            size = stage.stage_config.resolution
            settings = GenerationSettings(sampler=args.sampler, steps=steps, guidance=args.guidance,
                                          seed=args.seed + start, height=size, width=size,
                                          dynamic_threshold=args.dynamic_threshold)
            images = sample(stage, [r["caption"] for r in batch], settings,
                            strategy=SuperResolution(low, level, stage.stage_config.resize_mode, strength))
        for r, image in zip(batch, to_pil(images.float().cpu())):
            image.save(args.out / f"{r['key']}.png")
        print(f"{args.out}: {start + len(batch)}/{len(rows)}", file=sys.stderr)
    return 0


def tiles(image: Image.Image) -> list[Image.Image]:
    """The non-overlapping TILE x TILE tiles of an image, row by row."""
    w, h = image.size
    return [image.crop((x, y, x + TILE, y + TILE)) for y in range(0, h - TILE + 1, TILE)
            for x in range(0, w - TILE + 1, TILE)]


@torch.inference_mode()
def tile_features(clip: ClipModel, images: list[Image.Image], batch_size: int = 256) -> torch.Tensor:
    crops = [t for image in images for t in tiles(image)]
    return torch.cat([clip(torch.stack([clip.prepare(t) for t in crops[i: i + batch_size]]).to(clip.device)).cpu()
                      for i in range(0, len(crops), batch_size)])


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two 8-bit RGB images."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def score(args: argparse.Namespace) -> int:
    """PSNR and FD_CLIP-tiles of each image folder against the truth folder (the same file names)."""
    keys = sorted(p.stem for p in args.truth.glob("*.png"))
    if not keys:
        raise LdmError(f"no .png images in {args.truth}")
    clip = ClipModel.bundled(device=args.device)
    truth = [Image.open(args.truth / f"{k}.png").convert("RGB") for k in keys]
    real = stats_from_features(tile_features(clip, truth))
    results = {"truth": str(args.truth), "images": len(keys), "tiles_per_image": len(tiles(truth[0])),
               "feature_space": f"{clip.name} image embeddings of {TILE} px tiles (FD_CLIP-tiles, not FID)",
               "sets": {}}
    for folder in args.images:
        missing = [k for k in keys if not (folder / f"{k}.png").is_file()]
        if missing:
            raise LdmError(f"{folder} lacks {len(missing)} of the {len(keys)} images (e.g. {missing[0]}.png)")
        images = [Image.open(folder / f"{k}.png").convert("RGB") for k in keys]
        fake = stats_from_features(tile_features(clip, images))
        results["sets"][folder.name] = {
            "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(images, truth)])),
            "fd_clip_tiles": frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma),
        }
        print(folder.name, json.dumps(results["sets"][folder.name]))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


def figure(args: argparse.Namespace) -> int:
    """Rows of: the low-res input (nearest) | each image folder | the truth, for the first `--rows` held-out keys."""
    rows = read_captions(args.inputs)
    keys = [r["key"] for r in rows][:: max(1, len(rows) // args.rows)][: args.rows] if not args.keys else args.keys
    columns = [args.inputs / LOW, *args.images, args.inputs / TRUTH]
    size = 256
    sheet = Image.new("RGB", (size * len(columns), size * len(keys)), "white")
    for i, key in enumerate(keys):
        for j, folder in enumerate(columns):
            image = Image.open(folder / f"{key}.png").convert("RGB")
            sheet.paste(image.resize((size, size), Image.NEAREST), (j * size, i * size))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{args.out}: {len(keys)} rows x {len(columns)} columns ({', '.join(c.name for c in columns)})")
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/eval_sr.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inputs", help="held-out truth and low-res inputs from validation shards")
    i.add_argument("shards", help="glob of validation .tar shards (256 px)")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--low-res-size", type=int, default=64)
    u = sub.add_parser("upscale", help="upscale the low-res inputs with a model, or bicubic")
    u.add_argument("--inputs", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--model", default=None, help="an SR model folder")
    u.add_argument("--bicubic", action="store_true", help="bicubic upsampling instead of a model")
    u.add_argument("--size", type=int, default=256, help="output size for --bicubic")
    u.add_argument("--aug-level", type=float, default=None, help="default: the model's stage.aug_level")
    u.add_argument("--strength", type=finite_float, default=None,
                   help="start strength in (0, 1]: 1 = from pure noise, s = from the bicubic image noised s of the "
                   "way up, int(steps * s) steps (default: the model's stage.start_strength)")
    u.add_argument("--guidance", type=float, default=1.0)
    u.add_argument("--steps", type=int, default=None, help="default: the model's stage.steps, else 20")
    u.add_argument("--sampler", default="dpmpp_2m")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--dynamic-threshold", type=float, default=None, help="percentile; 0 = off (default: the model's)")
    u.add_argument("--batch-size", type=int, default=64)
    u.add_argument("--device", default=None)
    u.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)")
    s = sub.add_parser("score", help="PSNR and FD_CLIP-tiles against the truth")
    s.add_argument("--truth", type=Path, required=True)
    s.add_argument("--images", type=Path, nargs="+", required=True)
    s.add_argument("--json", type=Path, default=None)
    s.add_argument("--device", default="cpu")
    f = sub.add_parser("figure", help="side-by-side sheet: low-res | folders... | truth")
    f.add_argument("--inputs", type=Path, required=True)
    f.add_argument("--images", type=Path, nargs="+", required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--rows", type=int, default=6)
    f.add_argument("--keys", nargs="*", default=None)
    args = p.parse_args(argv)
    if args.command == "inputs":
        print(f"{write_inputs(args.shards, args.out, args.low_res_size)} held-out images in {args.out}")
        return 0
    if args.command == "upscale" and not args.bicubic and not args.model:
        raise LdmError("upscale needs --model DIR or --bicubic")
    return {"upscale": upscale, "score": score, "figure": figure}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
