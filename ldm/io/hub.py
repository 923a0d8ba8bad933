"""Hugging Face Hub ids: fetch only the files a diffusers pipeline folder needs, or fail at once when offline."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ldm.errors import CheckpointError
from ldm.io.checkpoint import VARIANTS, weight_file_names

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL
_TOKENIZERS = ("tokenizer", "tokenizer_2")


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` (a pipeline repo) or `owner/name/path/file.safetensors` (one file in a repo)."""
    if text.startswith((".", "/", "~")) or "\\" in text or os.path.exists(text):
        return False
    if not _HUB_ID.match(text):
        return False
    parts = text.split("/")
    return len(parts) > 2 or not parts[-1].lower().endswith(_WEIGHT_SUFFIXES)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host: without network this fails in seconds, not after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hint(repo_id: str) -> str:
    return (
        f"cannot fetch {repo_id!r} from the Hugging Face Hub ({{why}}), and no local path of that name exists. "
        "Download it where there is network access "
        f"(e.g. `hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`) and pass the local "
        "folder, or pass a local .safetensors/.ckpt file"
    )


def _pick_files(files: list[str]) -> list[str]:
    """The configs, tokenizers and one weights set per component (`weight_file_names`' preference: full precision,
    safetensors; a sharded index with its shards)."""
    keep = [f for f in files if f == "model_index.json" or f.split("/")[0] in _TOKENIZERS + ("scheduler",)]
    keep += [f for f in files if f.split("/")[0] in _COMPONENTS and f.endswith("config.json") and f.count("/") == 1]
    present = set(files)
    for comp in _COMPONENTS:
        stem = "model" if comp.startswith("text_encoder") else "diffusion_pytorch_model"
        for name, is_index in weight_file_names(stem):
            if f"{comp}/{name}" not in present:
                continue
            keep.append(f"{comp}/{name}")
            if is_index:  # model.safetensors.index[.fp16].json -> model[.fp16]-00001-of-00002.safetensors, ...
                base, ext, variant = _index_parts(name)
                shard = re.compile(rf"{re.escape(comp)}/{re.escape(base)}{re.escape(variant)}-\d+-of-\d+"
                                   rf"{re.escape(ext)}$")
                keep += [f for f in files if shard.match(f)]
            break
    return keep


def _index_parts(name: str) -> tuple[str, str, str]:
    """(base, suffix, '.variant' or '') of a shard index name."""
    for ext in (".safetensors", ".bin"):
        base, sep, rest = name.partition(ext)
        if sep:
            variant = rest.removeprefix(".index").removesuffix(".json")  # '' or '.fp16'
            if base.endswith(tuple(f".{v}" for v in VARIANTS)):  # the older model.fp16.safetensors.index.json
                base, variant = base.rsplit(".", 1)[0], "." + base.rsplit(".", 1)[1]
            return base, ext, variant
    raise ValueError(name)


def resolve_hub_id(text: str, *, revision: str | None = None) -> Path:
    """Return a local path (cached snapshot folder or file) for a hub id; CheckpointError if it cannot be had."""
    parts = text.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        import huggingface_hub as hub
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(_hint(repo_id).format(why="huggingface_hub is not installed")) from e
    offline = _offline()
    if not offline and not _hub_reachable():
        try:  # a snapshot cached earlier still works without network
            return Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True)) if filename is None \
                else Path(hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
        except Exception as e:
            raise CheckpointError(_hint(repo_id).format(why="the hub cannot be reached (no network)")) from e
    try:
        if filename is not None:
            return Path(hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline))
        if offline:
            return Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
        files = hub.HfApi().list_repo_files(repo_id, revision=revision)
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=_pick_files(files)))
    except Exception as e:  # offline cache miss, network error, unknown repo, gated repo ...
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise CheckpointError(_hint(repo_id).format(why=why)) from e
