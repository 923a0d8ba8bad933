"""The bundled 64 -> 256 upscaler (ldm/assets/default-upscaler): it loads, its manifest verifies, it shares the
default model's text encoder, and `--upscaler default` / `load_cascade("default", ["default"])` make 256 px images."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import CheckpointError, LdmError
from ldm.io.native_format import check_manifest, sha256_file
from ldm.pipeline import default_model
from ldm.pipeline.default_model import BUNDLED, BUNDLED_UPSCALER, default_upscaler_path

pytestmark = pytest.mark.skipif(not (BUNDLED_UPSCALER / "config.yaml").is_file() or
                                not (BUNDLED / "config.yaml").is_file(), reason="no bundled upscaler in this checkout")

PROMPT = "an emoji of a red apple, twemoji style"


def test_bundled_upscaler_manifest_verifies_and_a_changed_byte_is_refused(tmp_path):
    manifest = json.loads((BUNDLED_UPSCALER / "manifest.json").read_text())
    assert set(manifest["files"]) == {"unet.safetensors"}  # the text tower is the bundled CLIP's, not a copy
    assert check_manifest(BUNDLED_UPSCALER, ["unet"]) == manifest["step"]
    assert manifest["files"]["unet.safetensors"]["sha256"] == sha256_file(BUNDLED_UPSCALER / "unet.safetensors")
    copy = tmp_path / "copy"
    shutil.copytree(BUNDLED_UPSCALER, copy)
    data = bytearray((copy / "unet.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "unet.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match"):
        check_manifest(copy, ["unet"])


def test_bundled_upscaler_is_a_small_fp16_sr_stage_on_the_default_text_tower():
    from ldm.io.formats import load_model

    parts = load_model(str(default_upscaler_path()))
    stage = parts.config["stage"]
    assert (stage["low_res_size"], stage["resolution"]) == (64, 256)
    assert parts.config["text_encoder"]["pretrained"] == "../clip-emoji/clip-emoji.safetensors"
    assert (BUNDLED_UPSCALER / "unet.safetensors").stat().st_size < 8e6  # the package stays under 60 MB
    base = load_model(str(BUNDLED))
    mine, theirs = parts.text_encoder.state_dict(), base.text_encoder.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_missing_bundle_is_an_error_naming_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "BUNDLED_UPSCALER", tmp_path / "none")
    with pytest.raises(LdmError, match="no bundled upscaler"):
        default_model.default_upscaler_path()


@pytest.mark.slow
def test_default_cascade_makes_256px_images_on_the_cpu():
    from ldm import load_cascade

    cascade = load_cascade("default", ["default"], device="cpu")
    low, high = cascade(PROMPT, seed=0, stage_steps=[3, 2], guidance=1.0, return_all_stages=True)
    assert low[0].size == (64, 64) and high[0].size == (256, 256)
    # The SR stage follows its input: its output, shrunk back to 64 px, matches the base's image pixel by pixel far
    # better than the same image upside down does.
    shrunk = np.asarray(high[0].resize((64, 64), Image.BICUBIC), dtype=float).ravel()
    base = np.asarray(low[0], dtype=float)
    follows = np.corrcoef(shrunk, base.ravel())[0, 1]
    assert follows > 0.5 and follows > np.corrcoef(shrunk, base[::-1].ravel())[0, 1] + 0.2


@pytest.mark.slow
def test_txt2img_upscaler_default_writes_a_256px_png(tmp_path):
    from ldm.cli.txt2img import main

    assert main([PROMPT, "--upscaler", "default", "--stage-steps", "2,2", "--guidance", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 1 and Image.open(files[0]).size == (256, 256)


def test_a_python_call_without_settings_uses_each_stages_own_defaults():
    from ldm import load_cascade

    cascade = load_cascade("default", ["default"], device="cpu")
    sr = cascade.stages[1].default_settings
    assert (sr["steps"], sr["guidance"]) == (8, 1.0)  # the bundle's stage section, as ldm-txt2img applies it
    plain = cascade(PROMPT, seed=3)[0]
    base = cascade.stages[0].default_settings
    assert (base["steps"], base["guidance"], base["sampler"]) == (25, 5.0, "dpmpp_2m")  # the default model's own
    spelled = cascade(PROMPT, seed=3, stage_steps=[25, 8], stage_guidance=[5.0, 1.0])[0]
    assert np.array_equal(np.asarray(plain), np.asarray(spelled))
    common = cascade(PROMPT, seed=3, steps=8, guidance=1.0)[0]  # a common value given: every stage takes it
    assert not np.array_equal(np.asarray(plain), np.asarray(common))
