"""Precomputed latent shards: exact posterior and text embeddings, deduplicated captions, training from them."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_sd
from safetensors import safe_open

from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.data import DataConfig, make_loader
from ldm.data.latents import LATENTS_META, caption_hash, check_latent_shards
from ldm.data.shards import AtomicShardWriter, encode_image, iter_raw_samples, make_record
from ldm.data.synthetic import generate_shapes
from ldm.errors import LdmError
from ldm.io.formats import load_model
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoders import TextEncoder
from ldm.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
AUTOENCODER = dict(ch=16, norm_groups=8, shift_factor=0.1)  # over helpers.TINY_SD_SECTIONS: a latent shift too
CAPTIONS = ["a red circle in the centre", "a blue square on the left", "a green star"]  # 6 samples, 3 captions
FAST = ["progress=false", "log_with=none", "sampling.at_end=false", "data.batches_per_epoch=2", "checkpoint_every=2",
        "checkpoints_total_limit=null", "ema.decay=0.5", "model.random_autoencoder=false"]


def load_script():
    spec = importlib.util.spec_from_file_location("precompute_latents", ROOT / "data_scripts" / "precompute_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny", autoencoder=AUTOENCODER))


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    with AtomicShardWriter(out, samples_per_shard=3) as writer:
        for i, s in enumerate(generate_shapes(6, seed=0, image_size=32)):
            writer.write(make_record(s.key, encode_image(s.image, "png"), "png", CAPTIONS[i % 3], {"similarity": 0.3}))
    return str(out)


@pytest.fixture(scope="module")
def latent_dir(model_dir, image_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    code = load_script().main(["--model", model_dir, "--shards", image_shards, "--out", str(out), "--resolution", "32",
                               "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress",
                               "--samples-per-shard", "4", "--captions-per-file", "2"])
    assert code == 0
    return str(out)


def one_batch(shards, **kwargs):
    config = DataConfig(shards=shards, resampled=False, shuffle_buffer=0, num_workers=0, resolution=32, **kwargs)
    batches = list(make_loader(config))
    assert len(batches) == 1
    return batches[0]


def train_config(shards, out, model_dir, *overrides):
    data = apply_overrides(load_yaml(ROOT / "configs" / "tiny.yaml"), [*FAST, *overrides])
    data["data"]["shards"] = shards
    data["model"]["pretrained"] = {"autoencoder": model_dir, "text_encoder": model_dir}
    data["output_dir"] = str(out)
    return from_dict(TrainConfig, data)


def test_latent_shards_hold_the_posterior_and_text_embeddings_of_the_encoders(model_dir, image_shards, latent_dir):
    model = load_model(model_dir)
    images = one_batch(image_shards, batch_size=6)
    latents = one_batch(latent_dir, batch_size=6, sample_format="latent")
    assert latents["key"] == images["key"] and latents["caption"] == images["caption"]
    assert latents["latent_mean"].dtype == latents["text_tokens"].dtype == torch.float16
    with torch.no_grad():
        posterior = model.autoencoder.encode(images["image"])
        text = model.text_encoder.encode(images["caption"])
    assert latents["latent_mean"].shape == posterior.mean.shape == (6, 4, 16, 16)
    for got, want in [(latents["latent_mean"], posterior.mean), (latents["latent_std"], posterior.std),
                      (latents["text_tokens"], text.tokens), (latents["text_pooled"], text.pooled)]:
        torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)  # float16 storage
    assert torch.equal(latents["text_mask"], text.mask)
    assert not torch.equal(latents["latent_std"][0], latents["latent_std"][1])  # per sample, not a constant
    meta = json.loads((Path(latent_dir) / LATENTS_META).read_text())
    assert meta["scale_factor"] == 0.5 and meta["shift_factor"] == 0.1 and meta["sizes"] == [[32, 32]]
    assert meta["num_samples"] == 6 and meta["num_captions"] == 3 and meta["model"] == model_dir
    assert meta["encoders"]["text_encoder"]["class"] == "CLIPTextEncoder"


def test_identical_captions_are_stored_once(latent_dir):
    folder = Path(latent_dir)
    files = sorted(folder.glob("text-*.safetensors"))
    assert [f.name for f in files] == ["text-00000.safetensors", "text-00001.safetensors"]  # 2 captions per file
    stored = []
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            stored += [k.removesuffix(".tokens") for k in handle.keys() if k.endswith(".tokens")]
    assert sorted(stored) == sorted(caption_hash(c) for c in CAPTIONS)  # 3 embeddings for 6 samples
    raws = list(iter_raw_samples(sorted(folder.glob("*.tar"))))
    per_shard = [sum(r["__url__"] == str(t) for r in raws) for t in sorted(folder.glob("*.tar"))]
    assert per_shard == [4, 2]  # --samples-per-shard 4; no text embedding inside the tars:
    for raw in raws:
        assert set(raw) - {"__key__", "__url__", "__local_path__"} == {"latent.safetensors", "txt", "json"}
        meta = json.loads(raw["json"])
        assert meta["latent"]["text_sha1"] == caption_hash(raw["txt"].decode()) and meta["similarity"] == 0.3


def test_a_training_step_from_latents_has_the_loss_of_one_from_images(model_dir, image_shards, latent_dir, tmp_path):
    from ldm.train.loop import TrainState, prepare_inputs
    from ldm.train.model import DiffusionObjective, build_parts

    config = train_config(image_shards, tmp_path, model_dir, "data.caption_dropout=0.0")
    torch.manual_seed(0)
    parts = build_parts(config.model)
    objective = DiffusionObjective(parts, config.loss)
    with torch.no_grad():  # zero-initialised output layers would hide the latents (loss = E[noise^2]) and the text
        for param in parts.unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    latent_config = train_config(latent_dir, tmp_path, model_dir, "loss.inputs=latents")
    images = one_batch(image_shards, batch_size=6)
    latents = one_batch(latent_dir, batch_size=6, sample_format="latent")
    assert latents["key"] == images["key"]
    a = prepare_inputs(images, parts, objective, config, TrainState(), 0, torch.device("cpu"))
    b = prepare_inputs(latents, parts, objective, latent_config, TrainState(), 0, torch.device("cpu"))
    assert torch.equal(a["sigma"], b["sigma"]) and torch.equal(a["noise"], b["noise"])  # same per-sample seeds
    torch.testing.assert_close(b["x0"], a["x0"], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(b["cond"]["context"], a["cond"]["context"], rtol=2e-3, atol=2e-3)
    with torch.no_grad():
        loss_images, loss_latents = objective(**a), objective(**b)
    assert loss_images.shape == (6,) and loss_images.min() > 0
    torch.testing.assert_close(loss_latents, loss_images, rtol=1e-2, atol=1e-4)
    gap = (loss_latents - loss_images).abs().max()
    with torch.no_grad():  # the loss depends on the latents and on the text: the equality above is no coincidence
        rolled = objective(**{**b, "x0": b["x0"].roll(1, dims=0)})
        no_text = objective(**{**b, "cond": {"context": torch.zeros_like(b["cond"]["context"])}})
    assert (rolled - loss_images).abs().max() > 20 * gap and (no_text - loss_images).abs().max() > 20 * gap


def test_training_from_latent_shards_runs_neither_encoder(model_dir, latent_dir, tmp_path, monkeypatch):
    from ldm.train.checkpointing import list_checkpoints
    from ldm.train.loop import train
    from ldm.train.model import build_parts

    calls = {"autoencoder": 0, "prompts": []}
    encode, text_encode = AutoencoderKL.encode, TextEncoder.encode

    def count_encode(self, x):
        calls["autoencoder"] += 1
        return encode(self, x)

    def count_text(self, prompts):
        calls["prompts"] += list(prompts)
        return text_encode(self, prompts)

    monkeypatch.setattr(AutoencoderKL, "encode", count_encode)
    monkeypatch.setattr(TextEncoder, "encode", count_text)
    config = train_config(latent_dir, tmp_path / "run", model_dir, "max_steps=3", "loss.inputs=latents",
                          "data.sample_format=latent", "data.caption_dropout=0.9", "data.batch_size=2")
    out = train(config)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert calls["autoencoder"] == 0 and calls["prompts"] == [""]  # dropped captions in every batch: "" encoded once
    from safetensors.torch import load_file

    trained = load_file(str(out / "checkpoints" / "step-000003" / "model.safetensors"))
    torch.manual_seed(config.seed)
    initial = build_parts(config.model).unet.state_dict()
    changed = max((trained[f"denoiser.network.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert 1e-5 < changed < 1.0


def test_other_encoders_or_an_incomplete_set_are_refused(model_dir, image_shards, latent_dir, tmp_path):
    from ldm.train.loop import train

    other = load_model(write_tiny_sd(tmp_path / "other", seed=1, autoencoder=AUTOENCODER))
    same = load_model(model_dir)
    data = DataConfig(shards=latent_dir, sample_format="latent", resolution=32)
    assert len(check_latent_shards(data, same.autoencoder, same.text_encoder)) == 1
    with pytest.raises(LdmError, match=r"other encoders.*autoencoder\.sha1"):
        check_latent_shards(data, other.autoencoder, same.text_encoder)
    with pytest.raises(LdmError, match=r"other encoders.*text_encoder\.sha1"):
        check_latent_shards(data, same.autoencoder, other.text_encoder)
    with pytest.raises(LdmError, match="sizes"):
        check_latent_shards(DataConfig(shards=latent_dir, resolution=64), same.autoencoder, same.text_encoder)
    with pytest.raises(LdmError, match=LATENTS_META):
        check_latent_shards(DataConfig(shards=image_shards), same.autoencoder, same.text_encoder)
    config = train_config(latent_dir, tmp_path / "run", str(tmp_path / "other"), "max_steps=1", "loss.inputs=latents",
                          "data.sample_format=latent")
    with pytest.raises(LdmError, match="other encoders"):  # at the start of training, before any step
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_trainable_text_encoder_cannot_be_precomputed(image_shards, tmp_path, capsys):
    code = load_script().main(["--model", str(ROOT / "configs" / "tiny.yaml"), "--shards", image_shards,
                               "--out", str(tmp_path / "out"), "--num-workers", "0", "--no-progress"])
    assert code == 2 and "cannot be precomputed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
