"""Output locations checked before any work: a run must not fail after minutes because it cannot write its result."""
from __future__ import annotations

import os
from pathlib import Path

from ldm.errors import LdmError


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(folder: Path, what: str, path: Path) -> None:
    """`folder` (absent, or a folder) can be made / written into: its nearest existing ancestor is a writable folder."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise LdmError(f"{what} {path}: {base} is a file, so no folder can be made there; choose another location")
    if not os.access(base, os.W_OK | os.X_OK):
        raise LdmError(f"{what} {path}: no permission to write in {base}; choose a folder you can write to")


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """`path` is, or can become, a folder we can write files in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LdmError(f"{what} {path} is a file, not a folder; remove it or choose another name")
    _check_can_create_in(path, what, path)
    return path


def check_output_path(path: str | os.PathLike, what: str, *, folder: bool, overwrite: bool = False) -> Path:
    """`path` (a file, or a folder when `folder`) can be written atomically: created or, with `overwrite`, replaced."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise LdmError(f"{what} {path} exists; pass --overwrite to replace it")
        if path.is_dir() != folder:
            have, want = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
            raise LdmError(f"{what} {path} is {have} but {want} is written there; remove it or choose another name")
    _check_can_create_in(path.parent, what, path)  # atomic writes make a temporary sibling, then rename
    return path
