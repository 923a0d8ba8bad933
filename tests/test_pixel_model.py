"""A pixel-space model (no autoencoder) trains, exports without an autoencoder file, loads and generates."""
import numpy as np
import pytest

from ldm.config import load_yaml
from ldm.errors import LdmError
from ldm.models.codecs import IdentityCodec
from ldm.pipeline.load import load_pipeline
from ldm.train.loop import train
from helpers import tiny_train_config as tiny_config


@pytest.mark.slow
def test_a_pixel_model_trains_exports_and_generates(shape_shards, tmp_path):
    config = tiny_config(shape_shards, tmp_path / "run", "max_steps=2", "model.autoencoder=null", "model.unet.in_channels=3",
                         "model.unet.out_channels=3", "model.unet.sample_size=32")
    out = train(config)
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert files == ["text_encoder.safetensors", "unet.safetensors"]
    assert "autoencoder" not in load_yaml(out / "config.yaml")

    pipe = load_pipeline(out, device="cpu", dtype="fp32")
    assert pipe.autoencoder is None and isinstance(pipe.codec, IdentityCodec)
    assert pipe.factor == 2 and pipe.default_size == 32
    a = pipe("a red circle", steps=3, seed=1, guidance=2.0)
    b = pipe("a red circle", steps=3, seed=1, guidance=2.0)
    assert a[0].size == (32, 32) and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    with pytest.raises(LdmError, match="--height 31 is not a positive multiple of the model's factor 2"):
        pipe("a red circle", steps=3, height=31)
