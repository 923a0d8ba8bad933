"""Reading and writing weight files safely: `.safetensors`, `.ckpt`/`.pt`/`.pth`/`.bin`, strict state-dict checks."""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ldm.atomic import atomic_path
from ldm.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

VARIANTS = ("fp16",)  # the precision variants diffusers and transformers publish beside the full-precision files


def weight_file_names(stem: str) -> list[tuple[str, bool]]:
    """(file name, is a shard index) of a diffusers / transformers component's weights, in order of preference:
    full precision before the fp16 variant, safetensors before pickles, one file or a sharded index.

    `stem` is the safetensors name (`diffusion_pytorch_model`, `model`); transformers' pickles are `pytorch_model.bin`.
    A variant goes before the suffix (`model.fp16.safetensors`), its index before `.json`
    (`model.safetensors.index.fp16.json`, what diffusers' and transformers' save_pretrained(variant=) write); the
    older `model.fp16.safetensors.index.json` is read too.
    """
    pickles = ["pytorch_model", "model"] if stem == "model" else [stem]
    names: list[tuple[str, bool]] = []
    for variant in (None, *VARIANTS):
        for ext, bases in ((".safetensors", [stem]), (".bin", pickles)):
            for base in bases:
                if variant is None:
                    names += [(f"{base}{ext}.index.json", True), (f"{base}{ext}", False)]
                else:
                    names += [(f"{base}{ext}.index.{variant}.json", True), (f"{base}.{variant}{ext}.index.json", True),
                              (f"{base}.{variant}{ext}", False)]
    return names


# Globals that training frameworks store next to the weights (callbacks, hyper-parameters, numpy scalars of
# metrics). They are replaced by inert placeholders so that CompVis/Lightning `.ckpt` files load with
# `weights_only=True`; no code from the file runs, and the placeholders are dropped with everything that is
# not the state dict. Any other non-tensor global still needs --allow-pickle.
_METADATA_MODULE_ROOTS = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy")

_PICKLE_HINT = (
    "pass --allow-pickle (allow_pickle=True) only if you trust where the file came from, "
    "or convert it once to .safetensors"
)


def _placeholder(name: str) -> type:
    """An inert class standing in for a training-framework global: it stores its arguments and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    return type(name.rsplit(".", 1)[-1], (), {"__new__": __new__, "__init__": __init__, "__setstate__": __setstate__})


def _load_pickle(path: Path, allow_pickle: bool) -> object:
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files: let weights_only loading decide
        unsafe = []
    foreign = [g for g in unsafe if g.split(".", 1)[0] not in _METADATA_MODULE_ROOTS]
    if foreign:
        raise CheckpointError(
            f"{path}: the checkpoint holds Python objects that a safe load refuses ({', '.join(foreign[:3])}); "
            + _PICKLE_HINT
        )
    stubs = [(_placeholder(g), g) for g in unsafe]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        if not _is_pickle(path):  # --allow-pickle would not help: say so instead of offering it
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                                  "pickle); truncated or corrupt?") from e
        raise CheckpointError(f"{path}: a safe (weights-only) load failed; {_PICKLE_HINT}") from e


def _is_pickle(path: Path) -> bool:
    """Whether `path` is a torch.save zip archive or starts with a pickle: only then can --allow-pickle help."""
    if zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):  # the first pickle (a legacy file's magic number), to its STOP
                pass
    except Exception:  # noqa: BLE001 - an unknown opcode, a cut-off argument ...
        return False
    return True


STEP_KEY = "global_step"  # Lightning's count of optimizer steps, saved beside the weights


def _as_step(value) -> int | None:
    """A whole number of steps (an int or a one-element integer tensor), or None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pop_step(sd: dict) -> int | None:
    """Take a `global_step` number out of a state dict's own entries (a flat file's) and return it."""
    step = _as_step(sd.get(STEP_KEY))
    if step is not None:
        del sd[STEP_KEY]
    return step


def _unwrap(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """Unwrap Lightning's {'state_dict': ..., 'global_step': ...} (possibly nested), check that every value is a
    tensor; return it with the step found on the way (None if none)."""
    step = None
    while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        step = _as_step(obj.get(STEP_KEY)) if step is None else step
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"found {type(obj).__name__}")
    obj = dict(obj)
    inner = _pop_step(obj)
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}; is this a model checkpoint?")
    return {str(k): v for k, v in obj.items()}, inner if step is None else step


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a weights file into a CPU state dict; never runs pickled code unless `allow_pickle`."""
    return read_weights(path, allow_pickle=allow_pickle)[0]


def read_weights(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], int | None]:
    """(CPU state dict, the training step the file records or None): Lightning's `global_step`, beside the state
    dict or (a flat file's) among its entries, where it is taken out. Never runs pickled code unless `allow_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); download or copy it again")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...
            raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
        return sd, _pop_step(sd)
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {suffix!r}; expected one of {list(WEIGHT_SUFFIXES)}")
    try:
        obj = _load_pickle(path, allow_pickle)
    except CheckpointError:
        raise
    except Exception as e:  # garbage bytes make the unpickler fail in arbitrary ways (IndexError, KeyError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    return _unwrap(obj, path)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a `.safetensors` header ({} for other formats or none)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e


def _first(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state_dict(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise CheckpointError naming `source` and the first missing / unexpected / misshapen keys."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshapen = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if misshapen:
        problems.append(f"{len(misshapen)} key(s) with the wrong shape: {_first(misshapen, 3)}")
    if problems:
        raise CheckpointError(
            f"{source}: the weights do not fit the model config; " + "; ".join(problems)
            + ". Check that the checkpoint and the config (or --config) describe the same architecture."
        )


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, assign: bool = False) -> nn.Module:
    """Load `sd` into `module` after a strict check of names and shapes (never a silent partial load); `assign`
    makes `sd`'s tensors the module's own (dtype included) instead of copying them into its tensors."""
    check_state_dict(module.state_dict(), sd, source=source)
    module.load_state_dict({k: v.contiguous() for k, v in sd.items()} if assign else dict(sd), strict=True,
                           assign=assign)
    return module


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(sd: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict to `.safetensors` atomically (contiguous CPU tensors; shared storage copied apart)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        t = t.detach().to("cpu")
        key = _storage_key(t)
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == key[1]
        if key in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(_storage_key(t))
        out[name] = t
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta or None)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600; weights are as readable as any file
