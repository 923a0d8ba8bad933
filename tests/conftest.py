"""Suite-wide setup and the shared fixtures; plain helpers (tolerances, tiny models) live in helpers.py."""
import json
import os
import socket

import pytest
import torch
from helpers import SEED, TINY_CLIP, write_tiny_sd

from ldm.data.synthetic import write_shape_shards
from ldm.eval.clip_score import ClipModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup or connection attempt is refused and recorded: assert the list stays empty."""
    attempts = []

    def refuse(kind):
        def call(*args, **kwargs):
            attempts.append((kind, args[:2]))
            raise OSError(f"network access in a test: {kind}{args[:2]}")
        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return attempts


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny native Stable Diffusion folder (helpers.TINY_SD_SECTIONS); read it, never write into it."""
    return write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def shape_shards(tmp_path_factory):
    """12 captioned synthetic shapes (32 px PNG) in two webdataset shards; the folder as a string."""
    out = tmp_path_factory.mktemp("shapes")
    write_shape_shards(out, 12, seed=0, image_size=32, samples_per_shard=6, image_format="png")
    return str(out)


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory):
    """helpers.TINY_CLIP as an open_clip model-config JSON file (what --clip-model takes)."""
    path = tmp_path_factory.mktemp("clipcfg") / "ldm-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_config):
    """A random-weight open_clip scorer built from tiny_clip_config."""
    return ClipModel(str(tiny_clip_config), "none")
