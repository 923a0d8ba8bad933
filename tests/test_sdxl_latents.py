"""SDXL's text embeddings (both encoders: 2048-wide tokens, pooled bigG) and its size numbers are precomputed into
latent shards like SD-1/2's, and a training step from them is the step from the images (issue 14, sec. 4)."""
import importlib.util

import pytest
import torch
from helpers import ROOT

from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.data.config import DataConfig
from ldm.data.loader import make_loader
from ldm.data.shards import AtomicShardWriter, encode_image, make_record
from ldm.data.synthetic import generate_shapes
from ldm.io.native_format import save_native
from ldm.train.config import TrainConfig
from ldm.train.loop import TrainState, prepare_inputs
from ldm.train.model import DiffusionObjective, build_parts

pytestmark = pytest.mark.slow
CAPTIONS = ["a red circle", "a blue square on the left", "a red circle"]
FAST = ["progress=false", "log_with=none", "sampling.at_end=false", "data.caption_dropout=0.0", "data.crop=center"]


def precompute_main(argv) -> int:
    """data_scripts/precompute_latents.py's main (a script, not a module)."""
    spec = importlib.util.spec_from_file_location("precompute_latents", ROOT / "data_scripts" / "precompute_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def one_batch(shards: str, **kwargs) -> dict:
    batches = list(make_loader(DataConfig(shards=shards, resampled=False, shuffle_buffer=0, num_workers=0,
                                          resolution=32, **kwargs)))
    assert len(batches) == 1
    return batches[0]


def config(shards, out, model_dir, *overrides) -> TrainConfig:
    data = apply_overrides(load_yaml(ROOT / "configs" / "sdxl-tiny.yaml"), [*FAST, *overrides])
    data["data"]["shards"], data["output_dir"] = shards, str(out)
    if model_dir is not None:
        data["model"]["pretrained"] = {"autoencoder": model_dir, "text_encoder": model_dir}
        data["model"]["random_autoencoder"] = False
    return from_dict(TrainConfig, data)


def test_sdxl_embeddings_and_sizes_in_latent_shards(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_native(build_parts(config("unused", tmp_path, None).model).model_parts("tiny sdxl"), model_dir)
    images = tmp_path / "images"
    with AtomicShardWriter(images, samples_per_shard=3) as writer:
        for i, s in enumerate(generate_shapes(4, seed=0, image_size=32)):
            meta = {"original_height": 300 + i, "original_width": 200}
            writer.write(make_record(s.key, encode_image(s.image, "png"), "png", CAPTIONS[i % 3], meta))
    latents = tmp_path / "latents"
    code = precompute_main(["--model", str(model_dir), "--shards", str(images), "--out", str(latents),
                               "--resolution", "32", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
                               "--no-progress"])
    assert code == 0
    batch = one_batch(str(latents), batch_size=4, sample_format="latent")
    assert batch["text_tokens"].shape == (4, 77, 64) and batch["text_pooled"].shape == (4, 32)
    assert batch["micro"][:, 0].tolist() == [300.0, 301.0, 302.0, 303.0]
    assert batch["micro"][0, 1:].tolist() == [200.0, 0.0, 0.0, 32.0, 32.0]

    image_config = config(str(images), tmp_path / "a", str(model_dir))
    latent_config = config(str(latents), tmp_path / "b", str(model_dir), "loss.inputs=latents")
    parts = build_parts(image_config.model)
    objective = DiffusionObjective(parts, image_config.loss)
    a = prepare_inputs(one_batch(str(images), batch_size=4), parts, objective, image_config, TrainState(), 0,
                       torch.device("cpu"))
    b = prepare_inputs(batch, parts, objective, latent_config, TrainState(), 0, torch.device("cpu"))
    assert torch.equal(a["cond"]["micro"], b["cond"]["micro"])
    for key in ("context", "y"):
        torch.testing.assert_close(b["cond"][key], a["cond"][key], rtol=2e-3, atol=2e-3)
    with torch.no_grad():
        torch.testing.assert_close(objective(**b), objective(**a), rtol=1e-2, atol=1e-4)
