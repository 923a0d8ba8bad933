"""Offline tokenizers: CLIP BPE from open_clip's bundled vocabulary, T5 from a sentencepiece file, UTF-8 bytes."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ldm.atomic import atomic_path
from ldm.errors import LdmError

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 word-final bytes + 48894 merges + 2 special tokens
_MARKER = "ldm_tokenizer.json"  # written for tokenizers that need no files (open_clip, bytes)


def default_cache_dir() -> Path:
    """Where derived tokenizer files are kept: $LDM_CACHE, else $XDG_CACHE_HOME/ldm, else ~/.cache/ldm."""
    if os.environ.get("LDM_CACHE"):
        return Path(os.environ["LDM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm"


def _write_clip_bpe_files(folder: Path) -> None:
    """Write transformers' vocab.json + merges.txt equivalent of open_clip's `bpe_simple_vocab_16e6.txt.gz`."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]  # the first line is a header; CLIP uses 48894 merges
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_tokenizer(cache_dir: str | Path | None = None, pad_token: str = "<|endoftext|>", max_length: int = 77):
    """A transformers `CLIPTokenizer` with OpenAI CLIP's vocabulary, built offline from open_clip's BPE file.

    `pad_token`: "<|endoftext|>" (id 49407) as SD-1's tokenizer; "!" (id 0) as diffusers' SD-2 tokenizer, which pads
    like open_clip but, "!" being special, splits "!!" into two pad ids where open_clip has one "!!" token.
    """
    from transformers import CLIPTokenizer

    folder = Path(cache_dir or default_cache_dir()) / "clip-bpe"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        _write_clip_bpe_files(folder)
    # transformers 5 ignores `vocab_file=`; from_pretrained reads vocab.json + merges.txt from the folder.
    return CLIPTokenizer.from_pretrained(str(folder), unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                                         eos_token="<|endoftext|>", pad_token=pad_token, model_max_length=max_length)


def t5_tokenizer_from_sentencepiece(model_file: str | Path):
    """A transformers T5 tokenizer from a sentencepiece `.model` file (needs `protobuf`)."""
    from transformers import T5Tokenizer

    # T5Tokenizer(vocab_file=...) silently ignores the file; from_pretrained on a folder reads it.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, Path(tmp) / "spiece.model")
        return T5Tokenizer.from_pretrained(tmp, extra_ids=0)


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad 0, bos 1, eos 2, byte b -> b + 3 (no vocabulary files)."""

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 256 + 3

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without bos/eos."""
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        """Text of byte ids (special ids skipped, broken UTF-8 replaced)."""
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`b n` ids (bos, bytes, eos, padding; truncated to max_length) and the bool mask of real tokens."""
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.bos_id] + self.encode(text)[:max_length - 2] + [self.eos_id]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad_id


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """Write a tokenizer to `folder` atomically (transformers files, or a marker for file-less tokenizers)."""
    from open_clip.tokenizer import SimpleTokenizer

    with atomic_path(folder) as tmp:
        if isinstance(tokenizer, ByteTokenizer):
            tmp.mkdir()
            (tmp / _MARKER).write_text(json.dumps({"type": "bytes"}))
        elif isinstance(tokenizer, SimpleTokenizer):
            tmp.mkdir()
            (tmp / _MARKER).write_text(json.dumps({"type": "open_clip", "context_length": tokenizer.context_length}))
        elif hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        else:
            raise LdmError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")


def load_tokenizer(folder: str | Path) -> Any:
    """Read a tokenizer written by `save_tokenizer` (or any transformers tokenizer folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LdmError(f"tokenizer folder not found: {folder}")
    if (folder / _MARKER).is_file():
        info = json.loads((folder / _MARKER).read_text())
        if info["type"] == "bytes":
            return ByteTokenizer()
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=info["context_length"])
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise LdmError(f"cannot read a tokenizer from {folder}: {e}") from e
