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


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A weights file from a *random* state dict of torch-fidelity's InceptionV3 (BN statistics randomised too)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as mp:  # build it without its (downloading) weight loading
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    state = net.state_dict()
    gen = torch.Generator().manual_seed(1)
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=gen) * 0.1)
        elif k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(state, path)
    return path
