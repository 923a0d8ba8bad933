"""Training checkpoints `DIR/checkpoints/step-NNNNNN/`: written atomically, rotated, found again by `--resume latest`.

A checkpoint folder holds accelerate's `save_state` files (model weights as safetensors, optimizer, grad scaler,
RNG states of python/numpy/torch/cuda for every rank as `random_states_<rank>.pkl`), the EMA weights as
`ema.safetensors`, and `trainer_state.json` (step, data position, counters). We name the folders ourselves:
accelerate's automatic naming counts saves in `project_configuration.iteration`, which `load_state()` does not
restore (accelerate #1601, #3306). The EMA is saved as safetensors rather than registered with accelerate, whose
custom-object loader unpickles with `weights_only=False`.

Checkpoint life cycle and what a kill at each point leaves (docs/reliability.md):
- Written into `.step-NNNNNN.tmp/`, every file fsynced, then `files.json` (name -> size of every file) and
  `trainer_state.json` last, then renamed to `step-NNNNNN/`: a folder with that name is complete when written.
- Rotation renames a folder to `.step-NNNNNN.deleting` before deleting it, so a half-deleted checkpoint never looks
  complete; `tidy_checkpoints` (at the next start) removes what a kill left: `.tmp`, `.deleting`, `step-*` without
  `trainer_state.json`, and restores a `.old` (the same step being saved again) whose replacement never arrived.
- Before resuming, `checkpoint_problem` checks every file against `files.json` and every safetensors header, so a
  truncated or deleted file is found before accelerate reads it; `--resume latest` then falls back to the newest
  complete checkpoint with a warning.
- RNG states: accelerate 1.15 has no option to store them without pickle (`random_states_<rank>.pkl` is always a
  `torch.save` pickle); it loads them with `weights_only=True` (safe globals: numpy's RNG types only), so a
  malicious file cannot run code. A missing or unloadable one is not fatal (our noise comes from per-sample seeded
  generators, not the global RNG), but `load_checkpoint` warns about it instead of accelerate's silent skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm.errors import CheckpointError, LdmError, write_failure
from ldm.train.batches import TrainState, note_stream_change
from ldm.train.sharding import is_sharded, load_sharded_ema, save_sharded_ema

STATE_FILE = "trainer_state.json"  # written last: a folder without it is not a checkpoint
MANIFEST_FILE = "files.json"  # {file name: size in bytes} of the checkpoint, written just before STATE_FILE
EMA_FILE = "ema.safetensors"
RNG_PREFIX = "random_states_"  # accelerate's per-rank RNG pickles: optional on resume (a warning when unusable)
_NAME = re.compile(r"^step-(\d{6,})$")
_LEFTOVER = re.compile(r"^\.(step-\d{6,})\.(tmp|old|deleting)$")


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


def accelerate_files(accelerator) -> list[str]:
    """The files `accelerator.load_state` needs for what was prepared: model[_i].safetensors, optimizer[_i].bin, or
    under FSDP the metadata of each sharded model and optimizer folder."""
    if is_sharded(accelerator):
        from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME

        return [f"{FSDP_MODEL_NAME}_{i}/.metadata" for i in range(max(1, len(accelerator._models)))] + \
            [f"{OPTIMIZER_NAME}_{i}/.metadata" for i in range(len(accelerator._optimizers))]
    models = [f"model{f'_{i}' if i else ''}.safetensors" for i in range(max(1, len(accelerator._models)))]
    optimizers = [f"optimizer{f'_{i}' if i else ''}.bin" for i in range(len(accelerator._optimizers))]
    return models + optimizers + (["scaler.pt"] if accelerator.scaler is not None else [])


def checkpoint_problem(path: str | Path, required: Iterable[str] = ("model.safetensors",)) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from, naming the file; None when it is complete."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return f"{path / STATE_FILE} is missing (the checkpoint was never finished)"
    try:
        read_trainer_state(path)
        manifest = json.loads((path / MANIFEST_FILE).read_text()) if (path / MANIFEST_FILE).is_file() else {}
    except (CheckpointError, OSError, ValueError) as e:
        return f"{path / MANIFEST_FILE} or {STATE_FILE} is unreadable: {e}"
    for name in [*required, *(n for n in manifest if not n.startswith(RNG_PREFIX))]:
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if name in manifest and file.stat().st_size != manifest[name]:
            return f"{file} is truncated or changed ({file.stat().st_size} bytes; {manifest[name]} were written)"
    for file in sorted(path.glob("*.safetensors")):  # checkpoints written before files.json existed, too
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{file} is damaged ({e})"
    return None


def _resume_way_out(output_dir: str | Path) -> str:
    newest = [str(p) for _, p in list_checkpoints(output_dir)][-3:]
    if newest:
        return f"use --resume latest (the newest complete checkpoint) or one of {newest}"
    # 'latest' would start over here: say so rather than offer it
    return (f"no checkpoint is in {Path(output_dir) / 'checkpoints'} yet, so there is nothing to resume; "
            "run without --resume to start")


def check_resume_path(output_dir: str | Path, resume: str) -> Path:
    """The folder an explicit `--resume PATH` names, which must exist; the run's tools call this before anything is
    created or written (its contents are checked later, by `resolve_resume`)."""
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder; {_resume_way_out(output_dir)}")
    return path


def resolve_resume(output_dir: str | Path, resume: str | None,
                   required: Iterable[str] = ("model.safetensors",)) -> Path | None:
    """The checkpoint `--resume` names, checked: None (fresh run), "latest" (the newest complete one), or a path."""
    if resume is None:
        return None
    required = list(required)
    if resume == "latest":
        found = list_checkpoints(output_dir)
        rejected = []
        for _, path in reversed(found):
            problem = checkpoint_problem(path, required)
            if problem is None:
                if rejected:
                    warnings.warn(f"--resume latest: skipping {len(rejected)} damaged checkpoint(s) "
                                  f"({'; '.join(rejected)}); resuming from {path}, the newest complete one",
                                  stacklevel=2)
                return path
            rejected.append(problem)
        if rejected:
            raise CheckpointError(f"--resume latest: no checkpoint in {Path(output_dir) / 'checkpoints'} is complete "
                                  f"({'; '.join(rejected)}); start over with --overwrite")
        return None
    path = check_resume_path(output_dir, resume)
    way_out = _resume_way_out(output_dir)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete training checkpoint (no {STATE_FILE} inside); "
                              f"{way_out}")
    problem = checkpoint_problem(path, required)
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: {problem}; {way_out}")
    return path


def read_trainer_state(path: Path) -> dict:
    """The `trainer_state.json` of a checkpoint folder."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {Path(path) / STATE_FILE}: {e}") from e


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete(path: Path) -> None:
    """Rename to a hidden `.deleting` name first (atomic), then delete: a kill never leaves a half-deleted `step-*`."""
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `limit`; returns the deleted folders."""
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - limit)]]
    for path in doomed:
        _delete(path)
    return doomed


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the complete checkpoints of `output_dir` newer than `step` to `abandoned-step-NNNNNN` (main process).

    A run resumed from an older checkpoint (`--resume PATH`, rewinding past a loss spike) starts a new line of
    steps: the newer checkpoints belong to the line it left. Left as they were, a later `--resume latest` (a
    preempted job) would continue the abandoned line, and rotation would keep them over the new ones. Renamed, they
    are kept for the user but no longer taken for this run's."""
    moved = []
    for found, path in list_checkpoints(output_dir):
        if found > step:
            target = path.with_name(f"abandoned-{path.name}")
            n = 1
            while target.exists():
                target, n = path.with_name(f"abandoned-{n}-{path.name}"), n + 1
            os.replace(path, target)
            moved.append(target)
    return moved


def start_state(accelerator, checkpoint: Path | None, ema, output_dir: str | Path, max_steps: int,
                stream: dict) -> TrainState:
    """Every trainer's start: a fresh TrainState, or the one `checkpoint` restores (weights, optimizer and EMA loaded
    in place, newer checkpoints set aside, a changed data stream or a finished run said); `stream` recorded in it."""
    state = TrainState()
    if checkpoint is not None:
        state = TrainState.from_saved(load_checkpoint(accelerator, checkpoint, ema))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
        after_resume(accelerator, output_dir, state.step, max_steps)
        if accelerator.is_main_process:
            note_stream_change(state.stream, stream)
    state.stream = stream  # recorded in trainer_state.json: what the data position counts in
    return state


def after_resume(accelerator, output_dir: str | Path, step: int, max_steps: int | None = None) -> None:
    """Once a checkpoint of `step` is restored (every trainer): the newer checkpoints set aside, with a warning; and a
    warning when `max_steps` leaves nothing to train (the run then exports the checkpoint's weights as they are)."""
    if accelerator.is_main_process:
        if max_steps is not None and step >= max_steps:
            warnings.warn(f"the resumed checkpoint is at step {step}, at or past max_steps={max_steps}: nothing is "
                          f"trained, and what the run writes is step {step}'s weights; give --max-steps above {step} "
                          "to train on", stacklevel=2)
        for moved in set_aside_newer(output_dir, step):
            warnings.warn(f"{moved.name.removeprefix('abandoned-')} is newer than the resumed step {step}: renamed "
                          f"to {moved}, so that --resume latest never continues the line this run left", stacklevel=2)


def tidy_checkpoints(output_dir: str | Path) -> list[str]:
    """Clear what a kill left in `checkpoints/` (main process, before training); returns one note per change."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    notes = []
    for path in sorted(root.iterdir()):
        leftover = _LEFTOVER.match(path.name)
        if leftover and leftover.group(2) == "old" and not (root / leftover.group(1)).exists() \
                and (path / STATE_FILE).is_file():
            os.replace(path, root / leftover.group(1))  # killed while saving the same step again: the old one stands
            notes.append(f"restored {root / leftover.group(1)} from {path.name}")
        elif leftover or (_NAME.match(path.name) and path.is_dir() and not (path / STATE_FILE).exists()):
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path} (left by a run killed while writing or deleting a checkpoint)")
    return notes


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
        if ema is not None and is_sharded(accelerator):  # every rank: its slices (FSDP shards the EMA too)
            save_sharded_ema(ema, tmp, accelerator.process_index, accelerator.num_processes)
        elif accelerator.is_main_process and ema is not None:
            save_file(ema.state_dict(), str(tmp / EMA_FILE))
        accelerator.wait_for_everyone()  # every rank's files are in tmp
        if accelerator.is_main_process:
            sizes = {}
            for file in sorted(tmp.rglob("*")):  # FSDP's sharded model and optimizer are folders of files
                _fsync(file)  # on disk before the folder can be renamed into place
                if file.is_file():
                    sizes[file.relative_to(tmp).as_posix()] = file.stat().st_size
            _write_synced(tmp / MANIFEST_FILE, json.dumps(sizes, indent=2))
            _write_synced(tmp / STATE_FILE, json.dumps({**trainer_state, "step": step}, indent=2))
            old = final.with_name(f".{final.name}.old")
            if final.exists():  # the same step saved again (end of a run right after a periodic save)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _fsync(final.parent)
            rotate_checkpoints(output_dir, total_limit)
    except BaseException as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        # a full disk, a lost mount: say where and what, not a traceback (safetensors and torch.save report a full
        # disk in their own exception types, not as an OSError)
        if isinstance(e, OSError) or write_failure(e):
            reason = write_failure(e) or e
            raise CheckpointError(f"cannot write the checkpoint of step {step} to {tmp.parent}: {reason} ({e}); free "
                                  "space or fix the folder, then continue with --resume latest") from e
        raise
    accelerator.wait_for_everyone()
    return final


@contextmanager
def export_failures(out: str | Path):
    """Around a trainer's final export (every trainer checkpoints its last step first): a full disk or an unwritable
    folder becomes one error line that says the checkpoint is whole and how to export again."""
    try:
        yield
    except Exception as e:
        if write_failure(e) is None:
            raise
        raise LdmError(f"cannot write the exported model into {out}: {write_failure(e)} ({e}); the final checkpoint is "
                       "complete: free space, then run the same command with --resume latest (it trains no step and "
                       "exports again)") from e


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def check_rng_state(path: Path, rank: int) -> str | None:
    """Why `random_states_<rank>.pkl` in `path` cannot be restored (accelerate's load_state skips it silently)."""
    from accelerate.utils import load

    file = path / f"{RNG_PREFIX}{rank}.pkl"
    if not file.is_file():
        return f"{file} is missing"
    try:
        state = load(file)  # accelerate's own loader: weights_only=True, numpy's RNG types allowed
    except Exception as e:  # noqa: BLE001 - any failure here is what accelerate's load_state would swallow
        return f"{file} cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not isinstance(state, dict) or "torch_manual_seed" not in state:
        return f"{file} holds no RNG state"
    return None


def load_checkpoint(accelerator, path: str | Path, ema=None) -> dict:
    """Restore model, optimizer, scaler and RNG states (accelerate), the EMA, and return the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    problem = checkpoint_problem(path, accelerate_files(accelerator))
    if problem is not None:
        raise CheckpointError(f"cannot resume from {path}: {problem}")
    rng_problem = check_rng_state(path, accelerator.process_index)
    if rng_problem is not None:
        warnings.warn(f"{rng_problem}: resuming with a fresh RNG state (the sampled noise does not depend on it; "
                      "dropout and other global-RNG draws will differ from an uninterrupted run)", stacklevel=2)
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        lines = str(e).strip().splitlines()
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            shown = "\n".join(lines[:4]) + (f"\n\t... ({len(lines) - 4} more lines)" if len(lines) > 4 else "")
            raise CheckpointError(f"cannot restore the training state from {path}: it holds another model than the "
                                  f"config describes:\n{shown}\nresume with the config the run was trained with "
                                  "(its model section, as in DIR/train_config.yaml), or start a new run in another "
                                  "folder") from e
        raise CheckpointError(f"cannot restore the training state from {path}: {e}") from e
    if ema is not None and is_sharded(accelerator):
        load_sharded_ema(ema, path, accelerator.process_index, accelerator.num_processes)
    elif ema is not None:
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path} holds no {EMA_FILE}; was it written with ema.enabled=false?")
        device = next(iter(ema.shadow.values())).device if ema.shadow else "cpu"
        ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(device)))
    return state
