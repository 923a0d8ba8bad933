from dataclasses import dataclass, field

import pytest

from ldm.atomic import atomic_path, atomic_write_text
from ldm.config import apply_overrides, from_dict, load_yaml, save_yaml, to_plain
from ldm.errors import ConfigError


@dataclass
class Inner:
    width: int = 8
    mult: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-4
    inner: Inner = field(default_factory=Inner)
    depth: int | tuple[int, ...] = 1


def test_from_dict_builds_nested_and_converts_types():
    cfg = from_dict(Outer, {"lr": 1, "inner": {"mult": [1, 2, 4]}, "depth": [1, 2]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner.mult == (1, 2, 4)
    assert cfg.depth == (1, 2)
    assert to_plain(cfg) == {"name": "x", "lr": 1.0, "inner": {"width": 8, "mult": [1, 2, 4]}, "depth": [1, 2]}


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="widht"):
        from_dict(Outer, {"inner": {"widht": 3}})


def test_dotted_overrides_and_yaml_round_trip(tmp_path):
    cfg = apply_overrides({"a": {"b": 1}}, ["a.b=3", "a.c=[1, 2]", "d=null"])
    assert cfg == {"a": {"b": 3, "c": [1, 2]}, "d": None}
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
