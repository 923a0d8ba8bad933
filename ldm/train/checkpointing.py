"""Training checkpoints `DIR/checkpoints/step-NNNNNN/`: written atomically, rotated, found again by `--resume latest`.

A checkpoint folder holds accelerate's `save_state` files (model weights as safetensors, optimizer, grad scaler,
RNG states of python/numpy/torch/cuda for every rank as `random_states_<rank>.pkl`), the EMA weights as
`ema.safetensors`, and `trainer_state.json` (step, data position, counters). We name the folders ourselves:
accelerate's automatic naming counts saves in `project_configuration.iteration`, which `load_state()` does not
restore (accelerate #1601, #3306). The EMA is saved as safetensors rather than registered with accelerate, whose
custom-object loader unpickles with `weights_only=False`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ldm.errors import CheckpointError

STATE_FILE = "trainer_state.json"  # written last: a folder without it is not a checkpoint
EMA_FILE = "ema.safetensors"
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """`output_dir/checkpoints/step-NNNNNN` for an optimizer step."""
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first; temporary and half-written folders are ignored."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint folder `--resume` names: None (fresh run), "latest" (None when there is none yet), or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete training checkpoint (no {STATE_FILE} inside); "
                              f"use 'latest' or one of {[str(p) for _, p in list_checkpoints(output_dir)][-3:]}")
    return path


def read_trainer_state(path: Path) -> dict:
    """The `trainer_state.json` of a checkpoint folder."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {Path(path) / STATE_FILE}: {e}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `limit`; returns the deleted folders."""
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - limit)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def save_checkpoint(accelerator, output_dir: str | Path, step: int, trainer_state: dict, ema=None,
                    total_limit: int | None = None) -> Path:
    """Write a checkpoint of `step` on every rank into a temporary folder, then rename it into place (main rank)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")  # the same name on every rank (shared file system)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)  # every rank: its RNG states; main: the rest
        if accelerator.is_main_process:
            if ema is not None:
                save_file(ema.state_dict(), str(tmp / EMA_FILE))
            text = json.dumps({**trainer_state, "step": step}, indent=2)
            with open(tmp / STATE_FILE, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            old = final.with_name(f".{final.name}.old")
            if final.exists():  # the same step saved again (end of a run right after a periodic save)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(final.parent)
            rotate_checkpoints(output_dir, total_limit)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path, ema=None) -> dict:
    """Restore model, optimizer, scaler and RNG states (accelerate), the EMA, and return the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot restore the training state from {path}: {e}") from e
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path} holds no {EMA_FILE}; was it written with ema.enabled=false?")
        device = next(iter(ema.shadow.values())).device if ema.shadow else "cpu"
        ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(device)))
    return state
