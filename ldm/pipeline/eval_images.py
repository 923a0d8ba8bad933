"""Evaluation image sets: image i of a setting is one (prompt, seed) pair, generated in batches of mixed prompts by
any number of processes, resumable, and indexed only once complete.

Image i takes prompt `i // n_per_prompt` and the seed `derive_seed(seed, "eval-image", i)`; with per-image noise
(`Pipeline.batch`) its pixels depend on nothing else, so 1 or N processes and batch 1 or 32 give the same images.
Each PNG is written atomically and carries its record; `metadata.jsonl` is rewritten (atomically) from the complete
files only, so it never names a missing or truncated one. `settings.json` pins what a folder was made with: a resumed
run with other settings is refused instead of mixing two experiments in one folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.atomic import atomic_write_text
from ldm.errors import LdmError
from ldm.pipeline.generate import generation_bytes, is_out_of_memory, slug
from ldm.pipeline.images import read_png_parameters, save_png
from ldm.pipeline.memory import available_bytes
from ldm.runtime import derive_seed

SETTINGS_FILE = "settings.json"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


@dataclass(frozen=True)
class PlannedImage:
    """Image `index` of a setting: its prompt, its seed and its file name (all fixed by the index)."""

    index: int
    text: str
    seed: int
    file_name: str


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded with `seed` (one per image; no overlap between base seeds)."""
    return derive_seed(seed, "eval-image", index)


def plan_images(texts: list[str], n_per_prompt: int, seed: int) -> list[PlannedImage]:
    """Every image of a setting, in index order: `n_per_prompt` per prompt, prompt by prompt."""
    planned = []
    for i in range(len(texts) * n_per_prompt):
        text = texts[i // n_per_prompt]
        planned.append(PlannedImage(i, text, image_seed(seed, i), f"{i:06d}-{slug(text)}.png"))
    return planned


def prompts_fingerprint(texts: list[str]) -> str:
    """sha256 of the prompt list, so that a resumed run with another prompt file is recognised."""
    return hashlib.sha256(json.dumps(texts).encode("utf-8")).hexdigest()


def open_setting_folder(folder: str | os.PathLike, settings: dict, *, create: bool = True) -> Path:
    """Check (and with `create`, make) a setting's folder: a resumed one must hold the same `settings.json`.

    Refused: a folder made with other settings (the differing keys are named), and a non-empty folder without
    settings.json (images of unknown origin).
    """
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LdmError(f"{path}: unreadable ({e}); remove the folder or choose another --out") from e
        wanted = json.loads(json.dumps(settings))  # the JSON round trip: tuples become lists, as stored
        if stored != wanted:
            keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            diff = "; ".join(f"{k}: folder {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys)
            raise LdmError(f"{folder} was generated with other settings ({diff}); resume with the folder's settings, "
                           "or choose another --out")
        return folder
    if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
        raise LdmError(f"{folder} holds files but no {SETTINGS_FILE}: not a folder this command made; remove it or "
                       "choose another --out")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return folder


def clear_temporaries(folder: str | os.PathLike) -> None:
    """Remove what a killed run's atomic writes left behind (`.NAME.<random>.tmp` folders)."""
    folder = Path(folder)
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.startswith(".") and entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)


def image_record(image: PlannedImage, settings: dict, negative_prompt: str | None) -> dict:
    """What image `image` stores in its PNG and in metadata.jsonl."""
    return {**settings, "file_name": image.file_name, "text": image.text, "negative_prompt": negative_prompt,
            "index": image.index, "seed": image.seed}  # the image's own fields win over any setting's


def is_complete(path: Path, record: dict) -> bool:
    """Whether `path` is a whole PNG holding exactly `record` (a truncated or foreign file is not)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), os.SEEK_END)
            if f.read() != _PNG_END:
                return False
        return read_png_parameters(path) == json.loads(json.dumps(record))
    except (OSError, ValueError, KeyError):
        return False


def missing_images(folder: Path, planned: list[PlannedImage], settings: dict,
                   negative_prompt: str | None) -> list[PlannedImage]:
    """The planned images without a complete file in `folder`."""
    return [p for p in planned if not is_complete(folder / p.file_name, image_record(p, settings, negative_prompt))]


def check_batch_fits(pipe, batch_size: int, *, height: int | None, width: int | None, guidance: float) -> None:
    """Refuse a `--batch-size` whose estimated memory exceeds what the device has free, naming one that fits."""
    if batch_size < 1:
        raise LdmError(f"--batch-size must be positive, got {batch_size}")
    available = available_bytes(pipe.device)
    needed = generation_bytes(pipe, height, width, batch_size, guidance)
    if available is None or needed <= available:
        return
    fits = batch_size // 2
    while fits >= 1 and generation_bytes(pipe, height, width, fits, guidance) > available:
        fits //= 2
    way_out = f"use --batch-size {fits}" if fits >= 1 else "even one image does not fit: lower --height/--width"
    raise LdmError(f"--batch-size {batch_size}: generating {batch_size} images at once needs about "
                   f"{needed / 2**30:.1f} GiB of {pipe.device.type} memory, but {available / 2**30:.1f} GiB is free; "
                   f"{way_out}")


def generate_images(pipe, planned: list[PlannedImage], folder: str | os.PathLike, generation: dict, settings: dict,
                    *, batch_size: int, negative_prompt: str | None = None, rank: int = 0, world: int = 1,
                    progress: bool = True) -> int:
    """Generate this rank's share (every `world`-th) of `planned` into `folder`, `batch_size` at a time.

    `generation`: the keyword arguments of `pipe.batch` (sampler, steps, guidance, sizes, sampler_options ...);
    `settings`: what each record stores beside the prompt and seed. Returns the number of images written.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    mine = planned[rank::world]
    with tqdm(total=len(mine), desc=folder.name, unit="img", disable=not progress or rank != 0) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            try:
                images = pipe.batch([p.text for p in batch], [p.seed for p in batch], negative_prompt, **generation)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                raise LdmError(f"out of {pipe.device.type} memory generating a batch of {len(batch)} images "
                               f"(--batch-size {batch_size}); the images written so far are kept: rerun with "
                               f"--batch-size {max(1, batch_size // 2)} to continue") from e
            for p, image in zip(batch, images):
                save_png(image, folder / p.file_name, image_record(p, settings, negative_prompt))
            bar.update(len(batch))
    return len(mine)


def write_index(folder: str | os.PathLike, planned: list[PlannedImage], settings: dict,
                negative_prompt: str | None) -> list[dict]:
    """Rewrite `metadata.jsonl` atomically with the records of the complete images, in index order."""
    folder = Path(folder)
    records = [image_record(p, settings, negative_prompt) for p in planned]
    records = [r for r in records if is_complete(folder / r["file_name"], r)]
    atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records
