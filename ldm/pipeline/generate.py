"""Generate images for prompts into a folder: PNGs with their parameters, plus metadata.jsonl (imagefolder convention)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ldm.atomic import atomic_write_text
from ldm.pipeline.images import save_png
from ldm.pipeline.load import load_pipeline


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit] or "unconditional"


def _load_mode_images(init_image, mask_image) -> dict:
    """Open the img2img / inpainting inputs up front, with errors that name the file."""
    from PIL import Image, UnidentifiedImageError

    from ldm.errors import LdmError

    if mask_image is not None and init_image is None:
        raise LdmError("--mask needs --init-image (the image to inpaint)")
    out = {}
    for key, path in (("init_image", init_image), ("mask_image", mask_image)):
        if path is None:
            continue
        try:
            with Image.open(path) as image:
                out[key] = image.copy()
        except FileNotFoundError as e:
            raise LdmError(f"image not found: {path}") from e
        except (UnidentifiedImageError, OSError) as e:
            raise LdmError(f"cannot read image {path}: {e}") from e
    return out


def generate_to_folder(
    model,
    prompts: list[str],
    out_dir: str | os.PathLike,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 30,
    guidance: float = 7.5,
    guidance_rescale: float = 0.0,
    seed: int = 0,
    n_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    init_image: str | os.PathLike | None = None,  # img2img / inpainting source image
    strength: float | None = None,  # fraction of the schedule that is run (default 0.8 img2img, 1.0 inpainting)
    mask_image: str | os.PathLike | None = None,  # inpainting: white = repaint
    sampler_options: dict | None = None,  # extra sampler arguments, e.g. {"eta": 0.5}
) -> list[dict]:
    """Generate `n_per_prompt` images per prompt; return the metadata records written to `out_dir/metadata.jsonl`.

    `model` is a loaded pipeline or anything `load_pipeline` accepts. Prompt i uses a generator seeded with `seed + i`,
    so each prompt's images equal `pipe(prompt, seed=seed + i, n=n_per_prompt)`.
    """
    from tqdm.auto import tqdm

    pipe = model if callable(model) and hasattr(model, "settings") else load_pipeline(model, device=device, dtype=dtype)
    settings = dict(sampler=sampler, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale, n=n_per_prompt,
                    height=height, width=width, sampler_options=dict(sampler_options or {}))
    checked = pipe.settings(from_image=init_image is not None, inpainting=mask_image is not None, strength=strength,
                            **settings)  # fail before anything is written
    modes = _load_mode_images(init_image, mask_image)
    if init_image is not None:
        modes["strength"] = checked.strength
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata_path = out_dir / "metadata.jsonl"
    records = []
    if metadata_path.exists():
        records = [json.loads(line) for line in metadata_path.read_text().splitlines() if line.strip()]
    start = len(records)
    bar = tqdm(prompts, desc="prompts", disable=not progress or len(prompts) < 2)
    for i, prompt in enumerate(bar):
        images = pipe(prompt, negative_prompt, seed=seed + i, progress=progress and len(prompts) < 2, **modes,
                      **settings)
        for j, image in enumerate(images):
            file_name = f"{len(records):05d}-{_slug(prompt)}.png"
            record = {
                "file_name": file_name,
                "text": prompt,
                "negative_prompt": negative_prompt,
                "seed": seed + i,
                "batch_index": j,
                "sampler": sampler,
                "steps": steps,
                "guidance": guidance,
                "guidance_rescale": guidance_rescale or None,
                "sampler_options": dict(sampler_options) if sampler_options else None,
                "height": image.height,
                "width": image.width,
                "model": pipe.model_name,
            }
            if init_image is not None:
                record.update(init_image=str(init_image), strength=modes["strength"],
                              mask_image=str(mask_image) if mask_image is not None else None)
            save_png(image, out_dir / file_name, record)
            records.append(record)
        # Rewrite the whole index atomically after each prompt: an interrupted run leaves a consistent folder.
        atomic_write_text(metadata_path, "".join(json.dumps(r) + "\n" for r in records))
    return records[start:]
