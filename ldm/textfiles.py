"""Text files the user names (prompts, configs, metadata.jsonl): UTF-8, with errors that name the file and the line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ldm.errors import LdmError


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped); LdmError naming the line of a bad byte."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise LdmError(f"{what} not found: {path}") from e
    except IsADirectoryError as e:
        raise LdmError(f"{what} {path} is a folder, not a text file") from e
    except OSError as e:
        raise LdmError(f"cannot read {what} {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        kind = "a binary file, not text" if b"\x00" in data[:4096] else "not UTF-8 text"
        raise LdmError(
            f"{path}:{line}: {what} is {kind} (byte 0x{data[e.start]:02x} at column {column}); save it as UTF-8"
        ) from e


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file."""
    rows = []
    for lineno, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise LdmError(f"{path}:{lineno}: {what} line is not valid JSON ({e.msg}, column {e.colno})") from e
    return rows
