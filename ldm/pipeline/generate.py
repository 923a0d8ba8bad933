"""Generate images for prompts into a folder: PNGs with their parameters, plus metadata.jsonl (imagefolder convention)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from ldm.atomic import atomic_write_text
from ldm.errors import LdmError
from ldm.models.attention import get_attention_backend
from ldm.models.float8 import uses_float8
from ldm.models.fused_group_norm import uses_fused_group_norm
from ldm.pipeline.fast import running_stages
from ldm.pipeline.images import read_png_parameters, save_png
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.memory import available_bytes, check_fits, estimate_generation_bytes
from ldm.pipeline.settings import GenerationSettings, check_prompts, check_seed, with_defaults
from ldm.textfiles import read_jsonl
from ldm.writable import check_output_dir

_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # ldm.atomic's `.NAME.<mkdtemp>.tmp` folders a kill leaves
_IMAGE = re.compile(r"^(\d{5,})-.+\.png$")  # the names generate_to_folder gives: index, then the prompt's slug


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe summary of the prompt; a prompt without ASCII letters or digits is named by its hash."""
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if slug:
        return slug
    if not text.strip():
        return "unconditional"
    return "prompt-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _load_mode_images(init_image, mask_image) -> dict:
    """Open the img2img / inpainting inputs up front, with errors that name the file."""
    from PIL import Image, UnidentifiedImageError

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


def generation_bytes(pipe, height: int | None, width: int | None, n: int, guidance: float) -> int:
    """The estimated peak bytes of generating `n` images of `height` x `width` (None: the default size) in one call."""
    height, width = height or pipe.default_size, width or pipe.default_size
    return estimate_generation_bytes(pipe.unet.config, getattr(pipe.autoencoder, 'config', None), height=height,
                                     width=width, n=n, guidance=guidance is None or guidance > 1.0, dtype=pipe.dtype,
                                     attention_backend=get_attention_backend(), device_type=pipe.device.type)


def _check_memory(pipe, height: int | None, width: int | None, n: int, guidance: float) -> None:
    """Refuse a size and batch that cannot fit in the device's free memory, before allocating anything."""
    check_fits(generation_bytes(pipe, height, width, n, guidance), available_bytes(pipe.device),
               height=height or pipe.default_size, width=width or pipe.default_size, n=n, device=pipe.device)


def check_generation(
    pipe,
    *,
    sampler: str = "dpmpp_2m",
    steps: int | None = 30,
    guidance: float | None = 7.5,
    guidance_rescale: float = 0.0,
    n_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    init_image: str | os.PathLike | None = None,
    strength: float | None = None,
    mask_image: str | os.PathLike | None = None,
    sampler_options: dict | None = None,
    dynamic_threshold: float | None = None,
    micro_conditioning: dict | None = None,
    clip_skip: int | None = None,
    sigmas: str = "model",
) -> dict:
    """Every check that can fail before a generation starts (settings, input images, schedule, memory).

    Returns the img2img / inpainting keyword arguments for the pipeline (the opened images and the strength).
    """
    checked = pipe.settings(sampler=sampler, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale,
                            n=n_per_prompt, height=height, width=width, sampler_options=dict(sampler_options or {}),
                            dynamic_threshold=dynamic_threshold, from_image=init_image is not None, inpainting=mask_image is not None, strength=strength,
                            micro_conditioning=dict(micro_conditioning or {}), clip_skip=clip_skip,
                            sigmas=sigmas)
    modes = _load_mode_images(init_image, mask_image)
    if hasattr(pipe, "check_inputs"):  # a cascade: the image to upscale must be its start stage's input size
        pipe.check_inputs(**modes)
    if init_image is not None:
        modes["strength"] = checked.strength
    stage = getattr(pipe, "stage", None)
    if "init_image" in modes and stage is not None and stage.latent_upscaler:  # its output: the image, upscaled
        f = stage.codec.downsample_factor
        height, width = modes["init_image"].height * f, modes["init_image"].width * f
    _check_memory(pipe, height, width, n_per_prompt, checked.guidance)
    return modes


def _open_index(out_dir: Path) -> list[dict]:
    """The folder's records, after clearing a killed run's temporaries and indexing the images it wrote unlisted."""
    for entry in out_dir.iterdir():
        if entry.is_dir() and _TEMPORARY.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    metadata_path = out_dir / "metadata.jsonl"
    records = []
    if metadata_path.exists():
        for lineno, row in read_jsonl(metadata_path, "metadata.jsonl"):
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise LdmError(f"{metadata_path}:{lineno}: not a record with a \"file_name\"; repair or remove the "
                               "line, or choose another --out")
            records.append(row)
    listed = {r["file_name"] for r in records}
    adopted = []
    for path in sorted(p for p in out_dir.iterdir() if _IMAGE.match(p.name) and p.name not in listed):
        try:  # a PNG written after the last index update of a killed run: its text chunk holds its record
            params = read_png_parameters(path)
        except (OSError, ValueError, KeyError):
            continue  # not one of ours: leave it alone
        if isinstance(params, dict) and params.get("file_name") == path.name:
            adopted.append(params)
    if adopted:
        records += adopted
        atomic_write_text(metadata_path, "".join(json.dumps(r) + "\n" for r in records))
        warnings.warn(f"{metadata_path}: listed {len(adopted)} image(s) that an interrupted run wrote after its "
                      "last index update", stacklevel=3)
    return records


def _next_index(records: list[dict]) -> int:
    """The first file index after every listed one (file names stay unique when lines were removed by hand)."""
    numbers = [int(m.group(1)) for r in records if (m := _IMAGE.match(r["file_name"]))]
    return max([len(records) - 1, *numbers]) + 1


def generate_to_folder(
    model,
    prompts: list[str],
    out_dir: str | os.PathLike,
    *,
    sampler: str = "dpmpp_2m",
    steps: int | None = 30,  # None: the model's default (30; the x4 upscaler's 75; a cascade's per stage)
    guidance: float | None = 7.5,  # None: the model's default (7.5; the x4 upscaler's 9)
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
    sampler_options: dict | None = None,  # e.g. {"eta": 0.5}; the options each sampler takes are in its registry entry
    dynamic_threshold: float | None = None,  # percentile; None: the model's default (on for pixel models), 0: off
    noise_level: int | None = None,  # a latent upscaler's (x4) used alone; a cascade takes it from load_cascade
    micro_conditioning: dict | None = None,  # SDXL: original_size, crops_coords_top_left, target_size, aesthetic_score
    clip_skip: int | None = None,  # diffusers' clip_skip: CLIP text layers left out (None: the model's own layer)
    sigmas: str = "model",  # the sigma schedule: "model" (its scheduler config), "karras", "exponential", "beta"
) -> list[dict]:
    """Generate `n_per_prompt` images per prompt; return the metadata records written to `out_dir/metadata.jsonl`.

    `model` is a loaded pipeline (or cascade: each image's record then lists every stage's settings) or anything `load_pipeline` accepts. Prompt i uses a generator seeded with `seed + i`,
    so each prompt's images equal `pipe(prompt, seed=seed + i, n=n_per_prompt)`.
    """
    from tqdm.auto import tqdm

    out_dir = check_output_dir(out_dir)
    pipe = model if callable(model) and hasattr(model, "settings") else load_pipeline(model, device=device, dtype=dtype)
    settings = dict(sampler=sampler, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale, n=n_per_prompt,
                    height=height, width=width, sampler_options=dict(sampler_options or {}),
                    dynamic_threshold=dynamic_threshold, clip_skip=clip_skip, sigmas=sigmas)
    if micro_conditioning:  # only SDXL models take it (and the cascade has no such setting)
        settings["micro_conditioning"] = dict(micro_conditioning)
    # Fail before anything is written.
    check_prompts(prompts, negative_prompt, _guidance_used(pipe, guidance))
    check_seed(seed, len(prompts))
    modes = check_generation(pipe, sampler=sampler, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale,
                             n_per_prompt=n_per_prompt, height=height, width=width, init_image=init_image,
                             strength=strength, mask_image=mask_image, sampler_options=sampler_options,
                             dynamic_threshold=dynamic_threshold, micro_conditioning=micro_conditioning,
                             clip_skip=clip_skip, sigmas=sigmas)
    stage = getattr(pipe, "stage", None)
    if stage is not None:  # a single model: the settings it samples with (its own defaults) are recorded
        resolved = GenerationSettings(**with_defaults({"steps": steps, "guidance": guidance, "sampler": sampler},
                                                      stage.default_settings))
        steps, guidance, sampler = resolved.steps, resolved.guidance, resolved.sampler
        settings.update(steps=steps, guidance=guidance, sampler=sampler)
        if noise_level is not None or stage.latent_upscaler:
            modes["noise_level"] = pipe.noise_level(noise_level)
    elif noise_level is not None:  # a cascade records each stage's level
        raise LdmError("a cascade takes its --noise-level when it is built (load_cascade(..., noise_level=))")
    fp8 = any(uses_float8(s.unet) for s in running_stages(pipe))
    group_norm_kernel = any(uses_fused_group_norm(s.unet) for s in running_stages(pipe))
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata_path = out_dir / "metadata.jsonl"
    records = _open_index(out_dir)
    start = len(records)
    bar = tqdm(prompts, desc="prompts", disable=not progress or len(prompts) < 2)
    for i, prompt in enumerate(bar):
        try:
            images = pipe(prompt, negative_prompt, seed=seed + i, progress=progress and len(prompts) < 2, **modes,
                          **settings)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            raise _out_of_memory(pipe, settings, i, len(prompts)) from e
        for j, image in enumerate(images):
            file_name = f"{_next_index(records):05d}-{slug(prompt)}.png"
            record = {
                "file_name": file_name,
                "text": prompt,
                "negative_prompt": negative_prompt,
                "seed": seed + i,
                "batch_index": j,
                "sampler": sampler,
                "sampler_options": settings["sampler_options"] or None,
                "steps": steps,
                "guidance": guidance,
                "guidance_rescale": guidance_rescale or None,
                "clip_skip": clip_skip,  # None: the text encoder's own layer
                "sigmas": sigmas,  # "model": the model's scheduler config; "karras": its use_karras_sigmas=true, ...
                "height": image.height,
                "width": image.width,
                "model": pipe.model_name,
            }
            if fp8:
                record["fp8"] = True  # the transformer linears ran in FP8: images differ slightly from bf16's
            if group_norm_kernel:
                record["group_norm_kernel"] = True  # the Triton GroupNorm (where it could run): rounding differs
            if micro_conditioning:
                record["micro_conditioning"] = {k: list(v) if isinstance(v, (list, tuple)) else v
                                                for k, v in micro_conditioning.items()}
            if hasattr(pipe, "records"):  # a cascade: what every stage ran with
                record["stages"] = pipe.records(GenerationSettings(**{**settings, "seed": seed + i}))
            else:
                record["dynamic_threshold"] = pipe.stage.threshold_percentile(dynamic_threshold)
                if (cap := pipe.stage.threshold_cap(dynamic_threshold)) is not None:
                    record["dynamic_threshold_max"] = cap  # the cap on s (IF's sample_max_value)
                if (limit := pipe.stage.clip_limit(dynamic_threshold, sampler)) is not None:
                    record["clip_sample"] = limit  # x0 clipped to [-limit, limit] instead
                if "noise_level" in modes:
                    record["noise_level"] = modes["noise_level"]
            if init_image is not None:
                record.update(init_image=str(init_image), strength=modes["strength"],
                              mask_image=str(mask_image) if mask_image is not None else None)
            save_png(image, out_dir / file_name, record)
            records.append(record)
        # Rewrite the whole index atomically after each prompt: an interrupted run leaves a consistent folder.
        atomic_write_text(metadata_path, "".join(json.dumps(r) + "\n" for r in records))
    return records[start:]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device's out-of-memory: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _out_of_memory(pipe, settings: dict, i: int, total: int) -> LdmError:
    height, width = settings["height"] or pipe.default_size, settings["width"] or pipe.default_size
    return LdmError(f"out of {pipe.device.type} memory generating {settings['n']} image(s) of {width}x{height} "
                    f"(prompt {i + 1} of {total}); lower --n or --height/--width"
                    + (", or use --dtype fp16" if pipe.dtype == torch.float32 and pipe.device.type == "cuda" else ""))


def _guidance_used(pipe, guidance: float | None) -> float:
    """The first stage's guidance scale of a call: the given one, else the model's own default, else ldm's."""
    if guidance is not None:
        return guidance
    own = pipe.stages[0].default_settings.get("guidance")
    return own if own is not None else GenerationSettings.guidance
