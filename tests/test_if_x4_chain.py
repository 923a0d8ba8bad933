"""DeepFloyd IF's whole cascade from the CLI: IF-I -> IF-II -> the SD x4 upscaler, one PNG per prompt recording every
stage's settings, T5 encoded once for stages I and II, and the x4 stage with its own text encoder."""
import json

import pytest
import torch
from helpers import run_cli
from if_helpers import if_pipeline
from PIL import Image
from upscaler_helpers import tiny_diffusers_upscale_pipeline

from ldm.cli.txt2img import main as txt2img
from ldm.models.text_encoders import T5TextEncoder
from ldm.pipeline.images import read_png_parameters

pytest.importorskip("diffusers")


@pytest.mark.slow
def test_if_i_then_if_ii_then_x4_from_the_cli(tmp_path, capsys, monkeypatch):
    root = tmp_path / "models"
    base, sr = if_pipeline(root, False, sample_size=8)[1], if_pipeline(root, True, sample_size=32)[1]
    torch.manual_seed(0)
    tiny_diffusers_upscale_pipeline().save_pretrained(root / "x4")
    calls = []
    encode = T5TextEncoder._encode
    monkeypatch.setattr(T5TextEncoder, "_encode", lambda self, prompts: calls.append(list(prompts)) or
                        encode(self, prompts))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nan astronaut riding a horse\n")
    out = tmp_path / "out"
    code, err = run_cli(txt2img, ["--prompts", prompts, "--model", base, "--upscaler", sr, "--upscaler", root / "x4",
                                  "--stage-steps", "2,2,2", "--noise-level", 25, "--seed", 3, "--out", out], capsys)
    assert code == 0, err
    assert calls == [["a photo of a cat"], [""], ["an astronaut riding a horse"], [""]]  # once per prompt, not per stage
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len(list(out.glob("*.png"))) == 2
    for record in records:
        assert read_png_parameters(out / record["file_name"]) == record
        assert Image.open(out / record["file_name"]).size == (128, 128)  # 8 px, x4 by IF-II, x4 by the upscaler
        first, second, third = record["stages"]
        assert (first["size"], first["steps"], first["guidance"], first["sampler"]) == (8, 2, 7.0, "ddpm")
        assert (second["size"], second["steps"], second["guidance"], second["sampler"]) == (32, 2, 4.0, "ddpm")
        assert second["aug_level"] == pytest.approx(0.25683, abs=1e-5)  # IF's noise_level 250
        assert (third["size"], third["steps"], third["guidance"], third["noise_level"]) == (128, 2, 9.0, 25)
        assert third["text_encoder"] == "own" and third["dynamic_threshold"] is None
