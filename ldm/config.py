"""Configuration: a dataclass per component, YAML files, dotted overrides, and the resolved config saved beside runs."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from ldm.atomic import atomic_write_text
from ldm.errors import ConfigError
from ldm.textfiles import read_text

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML file into a dict, with a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_text(path, "config file"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, found {type(data).__name__}")
    return data


def save_yaml(data: Mapping, path: str | Path) -> None:
    """Write a dict as YAML atomically."""
    atomic_write_text(path, yaml.safe_dump(to_plain(data), sort_keys=False))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` into (['a','b','c'], value); the value is read as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(config: dict, overrides: list[str] | None) -> dict:
    """Return a copy of `config` with dotted `key=value` overrides applied (new keys allowed only in dicts)."""
    import copy

    config = copy.deepcopy(config)
    for text in overrides or []:
        path, value = parse_override(text)
        node = config
        for part in path[:-1]:
            if part not in node or not isinstance(node[part], dict):
                if part in node:
                    raise ConfigError(f"override {text!r}: {part!r} is not a section")
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return config


def to_plain(obj: Any) -> Any:
    """Turn dataclasses, tuples and paths into plain YAML/JSON-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# YAML 1.1 (PyYAML) reads `1e-4` and `5e-5` as strings (it wants `1.0e-4`); a float field takes them as numbers.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict:
        return "a mapping"
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if tp in (int, float, str, bool):  # a scalar key set to null (`optim.lr=null`) would fail deep inside
            raise ConfigError(f"{where}: expected {tp.__name__}, got null")
        return None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (ConfigError, TypeError, ValueError):
                continue
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):  # a string would be iterated letter by letter
            raise ConfigError(f"{where}: expected a list, got {value!r} (write [{value!r}] for a list of one)")
        inner = args[0] if args else Any
        seq = [_convert(inner, v, where) for v in value]
        return tuple(seq) if origin is tuple else seq
    if (tp is dict or origin is dict) and not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping (key: value), got {value!r}")
    if tp in (int, float) and isinstance(value, bool):  # True is an int to Python, never a count or a rate
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping | None, where: str | None = None) -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys with their names (no silent typos)."""
    where = where or cls.__name__
    if data is not None and not isinstance(data, Mapping):  # `optim=5`, a list where a section belongs
        raise ConfigError(f"{where}: expected a mapping (a section of key: value), got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)
