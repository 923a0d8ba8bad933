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


@dataclass
class Typed:
    lr: float = 1e-4
    limit: int | None = 3
    keys: list[str] = field(default_factory=lambda: ["jpg"])
    section: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def test_exponent_floats_written_without_a_dot_are_numbers():
    # PyYAML (YAML 1.1) reads `5e-5` as a string: the documented `optim.lr=5e-5` was refused as "expected float"
    assert from_dict(Typed, apply_overrides({}, ["lr=5e-5"])).lr == 5e-5
    assert from_dict(Typed, {"lr": "-1E3"}).lr == -1000.0
    with pytest.raises(ConfigError, match="lr: expected float, got 'fast'"):
        from_dict(Typed, {"lr": "fast"})


@pytest.mark.parametrize("data, message", [
    ({"limit": "abc"}, "limit: expected int or null, got 'abc'"),  # was returned as-is: a TypeError later
    ({"limit": True}, "limit: expected int or null, got True"),  # a bool is not a count
    ({"keys": "jpg"}, r"keys: expected a list, got 'jpg' \(write \['jpg'\]"),  # was iterated letter by letter
    ({"section": 5}, "section: expected a mapping"),
    ({"inner": 5}, "inner: expected a mapping"),  # was a TypeError from dict(5)
    ({"inner": [1, 2]}, "inner: expected a mapping"),
    ({"lr": None}, "lr: expected float, got null"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Typed, data, where="run.yaml")
