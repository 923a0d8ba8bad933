"""The native ldm folder: config.yaml (a section per part, plus the schedule), `<role>.safetensors` per part,
tokenizer/ where needed, and manifest.json (the step and a sha256 per weights file) that loading checks.

A latent model has unet/autoencoder/text_encoder files; a pixel model has no autoencoder file. A training run exports
into its run folder, beside its checkpoints: the model is staged whole, moved in, and its manifest moved last, so an
export cut short is refused on loading (the manifest names the file that does not match) instead of mixing steps.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ldm.atomic import atomic_path, atomic_write_text
from ldm.config import from_dict, load_yaml, save_yaml, to_plain
from ldm.diffusion.latent_upscale import SECTION as LATENT_UPSCALE_SECTION
from ldm.diffusion.latent_upscale import LatentUpscaleConfig
from ldm.diffusion.noise_augmentation import StageConfig
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import CheckpointError, ConfigError
from ldm.io.checkpoint import read_state_dict, write_safetensors
from ldm.io.components import ModelParts, make_parts
from ldm.io.part_types import read_section
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.tokenizers import save_tokenizer

FORMAT = "ldm-native-v1"
MANIFEST = "manifest.json"
SCHEDULE_SECTION = "scheduler"
STAGE_SECTION = "stage"  # a pixel cascade stage's StageConfig (sizes, augmentation level, dynamic thresholding)
REQUIRED = ("unet", SCHEDULE_SECTION)
# sections that configure a stage rather than a part: kept in ModelParts.config as checked plain dicts
STAGE_SECTIONS = {STAGE_SECTION: StageConfig, LATENT_UPSCALE_SECTION: LatentUpscaleConfig}
_NOT_PARTS = ("format", SCHEDULE_SECTION, *STAGE_SECTIONS)


def weights_file(role: str) -> str:
    """The weights file of the part with this role."""
    return f"{role}.safetensors"


FILES = {role: weights_file(role) for role in ("unet", "autoencoder", "text_encoder")}  # Stable Diffusion's


def is_native_folder(path: Path) -> bool:
    """A native folder: config.yaml next to unet.safetensors."""
    return path.is_dir() and (path / "config.yaml").is_file() and (path / weights_file("unet")).is_file()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """The hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _manifest_files(folder: Path) -> list[Path]:
    """The files a manifest covers: the weights (config.yaml stays hand-editable, e.g. its prediction_type)."""
    return sorted(folder.glob("*.safetensors"))


def write_manifest(folder: Path, step: int | None) -> None:
    """Record the step and each file's sha256 and size in `folder/manifest.json`."""
    files = {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in _manifest_files(folder)}
    atomic_write_text(folder / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1) + "\n")


def check_manifest(folder: Path, roles: list[str]) -> int | None:
    """Check every file against `manifest.json` (when there is one); returns the step it records."""
    path = folder / MANIFEST
    if not path.is_file():
        return None  # folders written before manifests existed
    try:
        manifest = json.loads(path.read_text())
        files, step = manifest["files"], manifest.get("step")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable manifest ({e}); re-export the model") from e
    at = f" (step {step})" if step is not None else ""
    for name in (weights_file(r) for r in roles):
        if name not in files:
            raise CheckpointError(f"{folder / name} is not in {path}{at}: the folder mixes two exports; re-export it")
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing but {path}{at} lists it: an incomplete export; re-export it")
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file} does not match {path}{at}: the file is from another export or damaged "
                                  "(an export interrupted part-way leaves this); re-export the model")
    return step


def load_native(folder: str | Path, *, device="cpu", dtype=None, prediction_type: str | None = None) -> ModelParts:
    """Load a folder written by `save_native` (or exported by a training run)."""
    folder = Path(folder)
    config = load_yaml(folder / "config.yaml")
    missing = [s for s in REQUIRED if s not in config]
    if missing:
        raise ConfigError(f"{folder / 'config.yaml'}: missing sections {missing} (a native model has a `unet` and "
                          f"a `{SCHEDULE_SECTION}` section, plus a section per other part)")
    roles = [r for r in config if r not in _NOT_PARTS]
    try:
        sections = {role: read_section(role, config[role]) for role in roles}
        sections[SCHEDULE_SECTION] = from_dict(ScheduleConfig, config[SCHEDULE_SECTION], where=SCHEDULE_SECTION)
        stages = {name: to_plain(from_dict(cls, config[name], where=name))  # checked now, kept as sections
                  for name, cls in STAGE_SECTIONS.items() if config.get(name) is not None}
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.yaml'}: {e}") from e
    sources = {role: folder / weights_file(role) for role in roles}
    shared = "text_encoder" in sources and not sources["text_encoder"].is_file() and \
        getattr(sections.get("text_encoder"), "pretrained", None)
    step = check_manifest(folder, [r for r in roles if not (shared and r == "text_encoder")])
    if shared:  # an open_clip text tower shared with a whole CLIP beside the folder (the bundled model)
        sources["text_encoder"] = shared_text_weights(folder, sections["text_encoder"])
    for role, source in sources.items():
        if not source.is_file():
            raise CheckpointError(f"{source} is missing: {folder / 'config.yaml'} has a {role!r} section, so the "
                                  f"folder needs its weights")
    weights = {role: read_state_dict(source) for role, source in sources.items()}
    if shared:
        weights["text_encoder"] = {f"model.{k}": v for k, v in weights["text_encoder"].items()
                                   if not k.startswith("visual.")}
    sources = {role: str(source) for role, source in sources.items()}
    tokenizer = folder / "tokenizer"
    notes = [f"native ldm folder {folder}" + (f" (exported at step {step})" if step is not None else "")]
    parts = make_parts(sections, weights, source=str(folder), sources=sources, device=device, dtype=dtype,
                       prediction_type=prediction_type, notes=notes,
                       tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
    parts.config.update(stages)
    return parts


def _write_folder(parts: ModelParts, folder: Path, step: int | None) -> None:
    folder.mkdir(parents=True)
    sections = {r: parts.config[r] for r in parts.roles}
    stage = {name: parts.config[name] for name in STAGE_SECTIONS if parts.config.get(name) is not None}
    save_yaml({"format": FORMAT, **sections, SCHEDULE_SECTION: parts.config[SCHEDULE_SECTION], **stage},
              folder / "config.yaml")
    for role, module in parts.parts.items():
        write_safetensors(module.state_dict(), folder / weights_file(role), metadata={"format": "pt"})
    tokenizer = getattr(parts.text_encoder, "tokenizer", None)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder / "tokenizer")
    write_manifest(folder, step)


ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the bundled models and CLIP


def shared_text_weights(folder: Path, text: TextEncoderConfig) -> Path:
    """The whole open_clip CLIP file whose text tower is this folder's text encoder (`text_encoder.pretrained`,
    relative to the folder): the bundled model shares its text tower with the bundled CLIP instead of a copy."""
    if text.type != "openclip" or not text.pretrained:
        raise CheckpointError(f"{folder}: no {FILES['text_encoder']}, and text_encoder.pretrained names no open_clip "
                              "weights file to take the text tower from")
    path = (folder / text.pretrained).resolve()
    # A model folder may come from anywhere: it names a .safetensors file beside it (or the bundled assets), never
    # an arbitrary file on disk and never a pickle.
    roots = [folder.resolve().parent, ASSETS.resolve()]
    if Path(text.pretrained).is_absolute() or path.suffix != ".safetensors" or \
            not any(path.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{folder}: text_encoder.pretrained={text.pretrained!r} must be a relative path to a "
                              ".safetensors file inside the model's parent folder or the bundled assets")
    if not path.is_file():
        raise CheckpointError(f"{folder}: the text tower comes from {text.pretrained} (text_encoder.pretrained), "
                              f"which does not exist at {path}")
    return path


def save_native(parts: ModelParts, folder: str | Path, *, step: int | None = None) -> None:
    """Write config.yaml, one weights file per part, the tokenizer and the manifest; the folder appears at once."""
    with atomic_path(folder) as tmp:
        _write_folder(parts, tmp, step)


def export_native(parts: ModelParts, folder: str | Path, *, step: int | None = None) -> None:
    """Write the model into `folder`, which holds other things too (a training run's checkpoints and logs).

    Staged whole in a hidden subfolder first; then the new manifest goes in first and the files after it. A crash
    at any point leaves either the previous export untouched or a folder whose manifest does not match its files,
    which loading refuses with a message naming the file: never a silent mix of two steps.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / ".export.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model = staging / "model"
    try:
        _write_folder(parts, model, step)
    except BaseException:  # a full disk: leave no half-written staging folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(model / MANIFEST, folder / MANIFEST)  # from here on only the complete new export matches
    for entry in sorted(model.iterdir()):
        if (folder / entry.name).is_dir():
            shutil.rmtree(folder / entry.name)
        os.replace(entry, folder / entry.name)
    shutil.rmtree(staging, ignore_errors=True)
