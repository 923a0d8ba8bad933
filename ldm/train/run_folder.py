"""The run folder of a training tool: one run per folder, checked before any work, tidied after a kill."""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

from ldm.data.loader import expand_shards
from ldm.errors import LdmError
from ldm.train.checkpointing import check_resume_path, tidy_checkpoints
from ldm.train.tracking import tracker_name
from ldm.writable import check_output_dir

# What the training tools write into a run folder; --overwrite deletes only a folder holding one of them.
RUN_ENTRIES = ("checkpoints", "logs", "samples", "train_config.yaml", "config.yaml", "metrics.json")


def check_run_folder(out: str | Path, resume: str | None, overwrite: bool, shards: Iterable = ()) -> None:
    """Before any work (every rank): `out` can be a writable folder, and a fresh run gets an empty one.

    `shards` (the run's shard patterns) are found before the folder is touched: a mistyped path neither deletes the
    old run (--overwrite) nor leaves a new folder behind."""
    out = Path(out)
    if resume is not None and overwrite:
        raise LdmError("--resume continues the run in --output-dir and --overwrite deletes it: give only one")
    check_output_dir(out, "--output-dir")  # not a file, nor under one
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and resume is None and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise LdmError(f"--output-dir {out} already holds a run ({shown}): continue it with --resume latest, "
                       "delete it and start again with --overwrite, or choose another folder")
    if entries and overwrite and not any(name in RUN_ENTRIES for name in entries):
        raise LdmError(f"--overwrite: {out} does not look like a run folder (it holds none of {', '.join(RUN_ENTRIES)}),"
                       " so it is left alone; choose another --output-dir")
    for pattern in shards:
        expand_shards(pattern)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # the real test of writability (permissions, read-only mounts, quotas)
            pass
    except OSError as e:
        raise LdmError(f"--output-dir {out} cannot be written ({e.strerror or e}); choose a writable folder") from e


def open_run(out: str | Path, resume: str | None, overwrite: bool, *, mixed_precision: str, log_with: str | None,
             shards: Iterable = (), **accelerator_kwargs):
    """The Accelerator of a training run in `out`: the folder, `shards` and an explicit `--resume` path checked
    first, then made ready (logs under out/logs)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(out)
    check_run_folder(out, resume, overwrite, shards)
    if resume is not None and resume != "latest":
        check_resume_path(out, resume)  # before the Accelerator exists: nothing is made for a mistyped path
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=tracker_name(log_with),
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
                              **accelerator_kwargs)
    prepare_run_folder(accelerator, out, overwrite)
    return accelerator


def prepare_run_folder(accelerator, out: str | Path, overwrite: bool) -> None:
    """After every rank checked the folder: delete the old run (`overwrite`), tidy what a kill left (main rank)."""
    out = Path(out)
    accelerator.wait_for_everyone()  # no rank writes before every rank has looked at the folder
    if accelerator.is_main_process:
        if overwrite:
            for entry in out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for note in tidy_checkpoints(out):
            warnings.warn(note, stacklevel=2)
    accelerator.wait_for_everyone()
