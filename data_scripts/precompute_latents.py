"""Encode image shards once with the frozen autoencoder and text encoder into latent shards.

A pixel-space model (Imagen's stages: no autoencoder) gets the same shards with the images themselves in place of
latents, so its frozen T5 (or other) text encoder runs once per unique caption instead of every step.

    python data_scripts/precompute_latents.py --model models/sd-v1-5 --shards 'data/laion/{00000..00099}.tar' \\
        --out data/laion_latents --resolution 512 --batch-size 32 --device cuda
    python tools/train.py --config configs/sd-v1.yaml --train-data data/laion_latents \\
        data.sample_format=latent loss.inputs=latents

Each sample keeps its key, caption and json and gets the posterior mean and std (float16, unscaled); each unique
caption's text embedding is stored once (text-NNNNN.safetensors, keyed by the caption's sha1). latents_meta.json
records the encoders (weights sha1), scale factor and sizes; training refuses shards made by other encoders.
--model takes anything ldm.io.formats.load_model reads, or a training YAML (its model section is built as
tools/train.py builds it, with its seed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.common import cli_main  # noqa: E402
from ldm.config import to_plain  # noqa: E402
from ldm.data.latents import (LATENTS_META, TextEmbeddingStore, caption_hash, encoder_identity,  # noqa: E402
                              latent_record, write_latents_meta)
from ldm.errors import LdmError  # noqa: E402
from ldm.runtime import resolve_dtype  # noqa: E402

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def load_encoders(model: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(autoencoder, text_encoder, their resolved configs) from a model (folder, file, hub id) or a training YAML."""
    path = Path(model)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from ldm.config import from_dict, load_yaml
        from ldm.train.config import TrainConfig
        from ldm.train.model import build_parts

        data = load_yaml(path)
        if "model" not in data:
            raise LdmError(f"--model {model}: a YAML must be a training config with a `model:` section")
        config = from_dict(TrainConfig, data, where=str(path))
        torch.manual_seed(config.seed)  # as tools/train.py: a random (test) autoencoder gets the same weights
        parts = build_parts(config.model)
        resolved = parts.resolved()
        return parts.autoencoder, parts.text_encoder, {k: resolved[k] for k in ("autoencoder", "text_encoder")}
    from ldm.io.formats import load_model

    components = load_model(model)
    return components.autoencoder, components.text_encoder, {k: components.config.get(k)
                                                             for k in ("autoencoder", "text_encoder")}


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds shards unless --overwrite (then remove only what this script writes)."""
    ours = [*out.glob("*.tar"), *out.glob("text-*.safetensors"), out / LATENTS_META]
    ours = [p for p in ours if p.exists()]
    if ours and not overwrite:
        raise LdmError(f"--out {out} already holds shards ({ours[0].name}, ...); choose an empty folder or pass "
                       "--overwrite")
    if (out / LATENTS_META).exists():
        (out / LATENTS_META).unlink()  # first: an interrupted rerun must not look complete
    for p in ours:
        p.unlink(missing_ok=True)


@torch.no_grad()
def precompute(loader, autoencoder, text_encoder, out: Path, *, samples_per_shard: int = 1000,
               captions_per_file: int = 4096, device: str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True) -> dict:
    """Encode every batch of `loader` into latent shards in `out`; returns counts for latents_meta.json."""
    from ldm.data.shards import AtomicShardWriter
    from ldm.train.model import encode_captions

    if autoencoder is not None:  # None: a pixel-space model, whose shards hold the images themselves
        autoencoder.to(device, dtype).eval()
    text_encoder.to(device, dtype).eval()
    store = TextEmbeddingStore(out, captions_per_file)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="latents", unit="img")
    with AtomicShardWriter(out, samples_per_shard) as writer:
        for batch in loader:
            if autoencoder is None:
                mean, std = batch["image"], [None] * len(batch["key"])
            else:
                posterior = autoencoder.encode(batch["image"].to(device, dtype))
                mean, std = posterior.mean, posterior.std
            image_size = tuple(batch["image"].shape[-2:])
            hashes = [caption_hash(c) for c in batch["caption"]]
            new = list(dict.fromkeys(h for h in hashes if h not in store))  # unique, first-seen order
            if new:
                text = dict(zip(hashes, batch["caption"]))
                emb = encode_captions(text_encoder, [text[h] for h in new])  # a long caption: said once
                for i, h in enumerate(new):
                    store.add(h, emb.tokens[i], emb.mask[i], None if emb.pooled is None else emb.pooled[i])
            for i, key in enumerate(batch["key"]):
                writer.write(latent_record(key, batch["caption"][i], batch["meta"][i], mean[i], std[i], image_size,
                                           hashes[i], store.where[hashes[i]], batch["micro"][i]))
            if bar is not None:
                bar.update(len(hashes))
        store.flush()
    if bar is not None:
        bar.close()
    skips = loader.skips.as_dict()
    return {"num_samples": writer.total, "num_captions": len(store), "shards": [p.name for p in writer.shards],
            "text_files": store.files, "skipped": skips}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder / checkpoint / hub id, or a training YAML")
    p.add_argument("--shards", required=True, help="image shards: folder, glob, brace pattern or file")
    p.add_argument("--out", required=True, type=Path, help="output folder for the latent shards")
    p.add_argument("--resolution", type=int, default=256, help="square image size encoded (center crop)")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of about resolution**2 pixels "
                   "(train with the same data.buckets)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help="compute dtype of the encoders "
                   "(storage is float16 either way)")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--captions-per-file", type=int, default=4096, help="unique captions per text-NNNNN.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace latent shards already in --out")
    p.add_argument("--no-progress", action="store_true")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ldm.data.buckets import make_buckets
    from ldm.data.config import DataConfig
    from ldm.data.loader import expand_shards, make_loader

    autoencoder, text_encoder, configs = load_encoders(args.model)
    identity = encoder_identity(autoencoder, text_encoder)  # refuses a trainable text encoder before any work
    data = DataConfig(shards=args.shards, batch_size=args.batch_size, num_workers=args.num_workers,
                      resolution=args.resolution, buckets=make_buckets(args.resolution) if args.buckets else None,
                      shuffle_buffer=0, resampled=False, caption_dropout=0.0, sample_format="image_with_meta")
    sources = expand_shards(data.shards)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare_out_dir(args.out, args.overwrite)
    counts = precompute(make_loader(data), autoencoder, text_encoder, args.out,
                        samples_per_shard=args.samples_per_shard, captions_per_file=args.captions_per_file,
                        device=args.device, dtype=resolve_dtype(args.dtype), progress=not args.no_progress)
    if counts["num_samples"] == 0:
        raise LdmError(f"no usable sample in {args.shards} (skip counts: {counts['skipped']})")
    ae = getattr(autoencoder, "config", None)
    write_latents_meta(args.out, {
        "model": str(args.model), "encoders": identity, **configs,
        "scale_factor": getattr(ae, "scale_factor", None), "shift_factor": getattr(ae, "shift_factor", None),
        "latent": "posterior mean and std, float16, unscaled: x0 = (mean + std * eps - shift_factor) * scale_factor"
                  if ae is not None else "the image in [-1, 1], float16 (a pixel-space model: no autoencoder)",
        "sizes": [list(s) for s in data.sizes], "crop": data.crop, "encode_dtype": args.dtype,
        "source_shards": sources, **to_plain(counts),
    })
    print(f"wrote {counts['num_samples']} samples ({counts['num_captions']} unique captions) in "
          f"{len(counts['shards'])} shards to {args.out}; skipped {counts['skipped'].get('skipped', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
