"""Offline tokenizers: CLIP BPE from open_clip's bundled vocabulary, T5 from a sentencepiece file, UTF-8 bytes."""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import math
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


def clip_bpe_file() -> Path:
    """OpenAI CLIP's BPE merges (`bpe_simple_vocab_16e6.txt.gz`), found in the installed open_clip without importing
    it (an import costs seconds: torchvision and transformers come with it)."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise LdmError("OpenAI CLIP's BPE vocabulary comes with the open_clip package (bpe_simple_vocab_16e6.txt.gz), "
                   "which is not installed: pip install open-clip-torch")


def byte_symbols() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 bytes to printable characters: printable Latin-1 bytes stand for
    themselves, the others (whitespace, control) for the characters from chr(256) on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


def clip_merges() -> list[str]:
    """The 48894 merges CLIP uses, `"a b"` per line (the file's first line is a header)."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    return lines[1:CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]


def _write_clip_bpe_files(folder: Path) -> None:
    """Write transformers' vocab.json + merges.txt equivalent of open_clip's `bpe_simple_vocab_16e6.txt.gz`."""
    merges = clip_merges()
    byte_chars = list(byte_symbols().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


class BPETokenizer:
    """OpenAI CLIP's byte-level BPE as open_clip tokenizes for its models (Radford et al. 2021; Sennrich et al. 2016).

    Text is cleaned as open_clip's default ("lower"): ftfy, HTML entities unescaped twice, whitespace collapsed, lower
    case. `tokenizer(texts)` gives `b context_length` ids: <start_of_text>, the text, <end_of_text> (kept as the last
    id when the text is cut), zero padding. `encode` / `decode` map one text without the special tokens.
    """

    START, END = "<start_of_text>", "<end_of_text>"

    def __init__(self, context_length: int = 77):
        import regex  # \p{L} / \p{N} classes (as CLIP's pattern); not in the standard library's re

        merges = [tuple(line.split()) for line in clip_merges()]
        self.byte_to_symbol = byte_symbols()
        self.symbol_to_byte = {c: b for b, c in self.byte_to_symbol.items()}
        symbols = list(self.byte_to_symbol.values())
        self.vocab = [*symbols, *(c + "</w>" for c in symbols), *("".join(m) for m in merges), self.START, self.END]
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab_size = len(self.vocab)
        self.sot_token_id, self.eot_token_id = self.ids[self.START], self.ids[self.END]
        self.context_length = context_length
        self._words: dict[str, list[str]] = {self.START: [self.START], self.END: [self.END]}
        # CLIP's pre-tokenizer: the special tokens, English contractions, letter runs, single digits, other symbols.
        self._pattern = regex.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                                      r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)

    @staticmethod
    def clean(text: str) -> str:
        """ftfy, HTML entities unescaped (twice, as CLIP), whitespace runs to one space, lower case."""
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _bpe(self, word: str) -> list[str]:
        """One pre-token's symbols merged by rank: the best-ranked adjacent pair first, everywhere, until none is left."""
        if word in self._words:
            return self._words[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._words[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without the start and end tokens."""
        ids = []
        for word in self._pattern.findall(self.clean(text)):
            symbols = "".join(self.byte_to_symbol[b] for b in word.encode("utf-8"))
            ids.extend(self.ids[part] for part in self._bpe(symbols))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids (word ends become spaces; bytes that do not form UTF-8 become U+FFFD)."""
        symbols = "".join(self.vocab[i] for i in ids)
        return bytes(self.symbol_to_byte[c] for c in symbols).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """`b context_length` long ids, zero-padded; a cut text still ends with <end_of_text>."""
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id][:length]
            tokens[-1] = self.eot_token_id
            out[row, :len(tokens)] = torch.tensor(tokens)
        return out


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
    # open_clip's own SimpleTokenizer is recognised without importing open_clip: the same vocabulary as BPETokenizer
    open_clip_bpe = type(tokenizer).__module__.startswith("open_clip") and type(tokenizer).__name__ == "SimpleTokenizer"
    with atomic_path(folder) as tmp:
        if isinstance(tokenizer, ByteTokenizer):
            tmp.mkdir()
            (tmp / _MARKER).write_text(json.dumps({"type": "bytes"}))
        elif isinstance(tokenizer, BPETokenizer) or open_clip_bpe:
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
        return BPETokenizer(context_length=info["context_length"])
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise LdmError(f"cannot read a tokenizer from {folder}: {e}") from e
