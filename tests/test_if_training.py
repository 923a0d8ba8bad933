"""Fine-tuning a DeepFloyd IF stage with the training loop: a tiny IF-I (learned-range variance, hybrid loss) trains a
few CPU steps from its diffusers folder, exports natively, samples, and converts back to a folder diffusers reads."""
import pytest
import torch
from helpers import FAST_TRAINING, ROOT, run_cli
from if_helpers import if_pipeline

from ldm.cli.convert import main as convert
from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.io.formats import load_model
from ldm.pipeline.load import load_pipeline
from ldm.train.config import TrainConfig
from ldm.train.loop import train


@pytest.mark.slow
def test_an_if_stage_fine_tunes_and_exports(shape_shards, tmp_path, capsys):
    _, folder = if_pipeline(tmp_path, False, sample_size=32)
    start = load_model(folder)
    data = apply_overrides(load_yaml(ROOT / "configs" / "tiny.yaml"), [*FAST_TRAINING, "max_steps=2",
                                                                          "model.autoencoder=null"])
    data["model"].update(
        unet=start.config["unet"],  # the folder's own architecture (type: if_unet), as ldm-convert writes it
        text_encoder={"type": "t5", "pretrained": str(folder), "max_length": 77, "zero_padding": False,
                      "lowercase": True},  # T5 and its tokenizer from the diffusers folder, frozen
        schedule=start.config["scheduler"], stage=start.config["stage"], pretrained={"unet": str(folder)})
    data["data"].update(shards=shape_shards, resolution=32)
    data["output_dir"] = str(tmp_path / "run")
    out = train(from_dict(TrainConfig, data))

    tuned = load_model(out)
    assert tuned.config["unet"]["type"] == "if_unet" and tuned.unet.config.learn_sigma
    before, after = start.unet.state_dict(), tuned.unet.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the U-Net trained
    text_before, text_after = start.text_encoder.state_dict(), tuned.text_encoder.state_dict()
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)  # T5 stayed frozen

    image = load_pipeline(out)("a photo of a cat", seed=0, steps=2, guidance=7.0, sampler="ddpm")[0]
    assert image.size == (32, 32)
    back = tmp_path / "diffusers"
    assert run_cli(convert, [out, back, "--to", "diffusers"], capsys)[0] == 0
    import diffusers

    pipe = diffusers.IFPipeline.from_pretrained(back, safety_checker=None, watermarker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    assert pipe.scheduler.config.variance_type == "learned_range" and pipe.scheduler.config.sample_max_value == 1.5
