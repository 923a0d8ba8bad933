"""Safe checkpoint reading, strict loading with named keys, atomic safetensors writing."""
import sys
import types

import pytest
import torch
from torch import nn

import ldm.io.hub as hub
from ldm.errors import CheckpointError
from ldm.io.checkpoint import load_into, read_safetensors_metadata, read_state_dict, write_safetensors


class Payload:
    """A non-tensor class object: unpickling it would import and construct arbitrary code."""

    def __init__(self):
        self.value = 3


def _sd():
    return {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}


def test_safetensors_round_trip_with_shared_storage_and_metadata(tmp_path):
    base = torch.arange(12.0)
    sd = {"x": base, "x_view": base[2:6], "tied": base, "t": torch.arange(6.0).reshape(2, 3).t()}
    path = tmp_path / "w.safetensors"
    write_safetensors(sd, path, metadata={"format": "pt", "config": {"a": 1}})
    back = read_state_dict(path)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])
    assert read_safetensors_metadata(path) == {"format": "pt", "config": '{"a": 1}'}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind


def test_lightning_ckpt_is_unwrapped(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": _sd(), "global_step": 7, "epoch": 1}, path)
    back = read_state_dict(path)
    assert list(back) == ["a.weight", "b"] and torch.equal(back["a.weight"], _sd()["a.weight"])


def test_lightning_metadata_objects_load_without_running_them(tmp_path, monkeypatch):
    # CompVis .ckpt files pickle pytorch_lightning callback classes beside the weights.
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __setstate__(self, state):
            raise AssertionError("the file's class must not be used")

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    path = tmp_path / "lightning.ckpt"
    obj = object.__new__(ModelCheckpoint)
    obj.__dict__["best"] = 1.5
    torch.save({"state_dict": _sd(), "callbacks": {ModelCheckpoint: {"best": 1}}, "cb": obj}, path)
    back = read_state_dict(path)
    assert torch.equal(back["b"], _sd()["b"])


def test_pickle_with_foreign_object_needs_the_flag(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _sd(), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*--allow-pickle"):
        read_state_dict(path)
    back = read_state_dict(path, allow_pickle=True)
    assert torch.equal(back["a.weight"], _sd()["a.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".bin"])
def test_truncated_and_garbage_files_name_the_file(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".safetensors":
        write_safetensors(_sd(), good)
    else:
        torch.save(_sd(), good)
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cut\{suffix}.*truncated or corrupt"):
        read_state_dict(cut)
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=rf"junk\{suffix}"):
        read_state_dict(junk)


def test_only_a_real_pickle_is_told_to_try_allow_pickle(tmp_path):
    """--allow-pickle cannot read junk or an empty file: the message says what the file is instead."""
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all " * 10)
    with pytest.raises(CheckpointError, match=r"junk\.ckpt: not a PyTorch checkpoint \(neither") as error:
        read_state_dict(junk)
    assert "--allow-pickle" not in str(error.value)
    for suffix in (".ckpt", ".safetensors"):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        with pytest.raises(CheckpointError, match=rf"empty\{suffix}: the file is empty \(0 bytes\)"):
            read_state_dict(tmp_path / f"empty{suffix}")
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip torch.save format holding a foreign object: the flag does help
    torch.save({"state_dict": _sd(), "payload": Payload()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.ckpt: a safe \(weights-only\) load failed; pass --allow-pickle"):
        read_state_dict(legacy)
    assert torch.equal(read_state_dict(legacy, allow_pickle=True)["a.weight"], _sd()["a.weight"])


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.safetensors"):
        read_state_dict(tmp_path / "nope.safetensors")
    other = tmp_path / "w.npz"
    other.write_bytes(b"123")
    with pytest.raises(CheckpointError, match=r"w\.npz.*unknown weights format"):
        read_state_dict(other)


def test_non_tensor_state_dict_is_refused(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"a": torch.ones(1), "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match=r"opt\.pt.*not tensors.*'lr'"):
        read_state_dict(path)


def test_load_into_is_strict_and_names_keys():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    good = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    load_into(net, good, source="good.safetensors")
    assert torch.equal(net[1].weight, good["1.weight"])

    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = dict(good)
    del bad["0.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["1.weight"] = torch.zeros(2, 5)
    bad["0.weight"] = torch.full((4, 3), 7.0)
    with pytest.raises(CheckpointError) as err:
        load_into(net, bad, source="bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "1 missing key(s): 0.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "1.weight (file (2, 5), model (2, 4))" in msg
    # nothing was loaded: no silent partial load
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_no_network_fixture_refuses_and_records_the_hub_probe(no_network):
    assert hub._hub_reachable(timeout=0.1) is False
    assert [kind for kind, _ in no_network] == ["create_connection"]


def test_unreachable_hub_fails_at_once_with_the_local_path_hint(monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CheckpointError, match="local"):
        hub.resolve_hub_id("someone/not-cached-model")
    assert no_network == []  # once the probe fails, only the local cache is asked: no retries against the hub
