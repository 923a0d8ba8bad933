"""Prompt sets: plain text (one prompt a line), jsonl (`{"text": ..., "category": ...}`) or a .tsv with a caption
column (COCO-style caption lists), by path or bundled name."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import LdmError
from ldm.textfiles import read_text

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


@dataclass(frozen=True)
class Prompt:
    """A prompt and its category (None for plain-text sets)."""

    text: str
    category: str | None = None


def bundled_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with ldm (usable in place of a path)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*") if p.suffix in (".txt", ".jsonl"))


def _resolve(path_or_name: str | os.PathLike) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path
    for suffix in (".jsonl", ".txt"):
        candidate = BUNDLED_DIR / f"{path_or_name}{suffix}"
        if candidate.is_file():
            return candidate
    raise LdmError(
        f"prompt set {str(path_or_name)!r}: no such file, nor a bundled set ({', '.join(bundled_prompt_sets())})"
    )


CAPTION_COLUMNS = ("caption", "text", "prompt")  # the first of these a .tsv header names is read


def _load_tsv(path: Path) -> list[Prompt]:
    """A tab-separated table whose header names a caption column (`caption`, `text` or `prompt`)."""
    rows = list(csv.reader(read_text(path, "prompt set").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise LdmError(f"{path}: the prompt set is empty")
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in CAPTION_COLUMNS if c in header), None)
    if column is None:
        raise LdmError(f"{path}: no caption column in the header ({', '.join(rows[0]) or 'empty'}); name one of "
                       f"{', '.join(CAPTION_COLUMNS)}")
    category = header.index("category") if "category" in header else None
    prompts = []
    for lineno, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= column or not row[column].strip():
            raise LdmError(f"{path}:{lineno}: no caption in column {column + 1} ({rows[0][column]!r})")
        label = row[category].strip() if category is not None and len(row) > category else None
        prompts.append(Prompt(row[column].strip(), label or None))
    if not prompts:
        raise LdmError(f"{path}: the prompt set has a header but no captions")
    return prompts


def load_prompts(path_or_name: str | os.PathLike) -> list[Prompt]:
    """Read a prompt set; in .txt files blank lines and lines starting with `#` are skipped."""
    path = _resolve(path_or_name)
    if path.suffix == ".tsv":
        return _load_tsv(path)
    prompts = []
    for lineno, line in enumerate(read_text(path, "prompt set").splitlines(), 1):
        stripped = line.strip()
        if not stripped or (path.suffix != ".jsonl" and stripped.startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise LdmError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise LdmError(f'{path}:{lineno}: each line needs a non-empty string "text" field')
            prompts.append(Prompt(row["text"].strip(), row.get("category")))
        else:
            prompts.append(Prompt(stripped))
    if not prompts:
        raise LdmError(f"{path}: the prompt set holds no captions (blank lines and # comments only)")
    return prompts
