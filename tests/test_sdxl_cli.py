"""ldm-txt2img on SDXL: the micro-conditioning flags, the refiner ensemble, a replacement VAE, and the errors."""
import json

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from sdxl_helpers import save_diffusers_sdxl

from ldm.cli import txt2img

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow
FAST = ["--steps", "3", "--height", "32", "--width", "32", "--sampler", "euler", "--guidance", "3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return save_diffusers_sdxl(root / "base")[0], save_diffusers_sdxl(root / "refiner", refiner=True, seed=10)[0]


def image(folder):
    record = json.loads((folder / "metadata.jsonl").read_text().splitlines()[-1])
    return np.asarray(Image.open(folder / record["file_name"]), float), record


def test_micro_conditioning_flags_reach_the_image_and_the_record(models, tmp_path, capsys):
    base, _ = models
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--out", tmp_path / "a", *FAST], capsys)
    assert code == 0, err
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--out", tmp_path / "b", *FAST,
                                       "--original-size", "512", "256", "--crops-coords-top-left", "16", "0",
                                       "--target-size", "64", "64"], capsys)
    assert code == 0, err
    plain, _ = image(tmp_path / "a")
    sized, record = image(tmp_path / "b")
    assert record["micro_conditioning"] == {"original_size": [512, 256], "crops_coords_top_left": [16, 0],
                                            "target_size": [64, 64]}
    assert np.abs(plain - sized).mean() > 0.5


def test_refiner_ensemble_from_the_command_line(models, tmp_path, capsys):
    base, refiner = models
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--refiner", refiner, "--high-noise-frac", "0.5",
                                       "--out", tmp_path / "e", *FAST, "--aesthetic-score", "7"], capsys)
    assert code == 0, err
    _, record = image(tmp_path / "e")
    assert "refiner" in record["model"]


@pytest.mark.parametrize("argv, message", [
    (["--aesthetic-score", "6"], "--aesthetic-score: the model takes"),
    (["--high-noise-frac", "0.8"], "--high-noise-frac: give the refiner"),
    (["--original-size", "1", "2", "--refiner", "REFINER", "--init-image", "IMG"], "--init-image"),
])
def test_errors_name_the_flag(models, tmp_path, capsys, argv, message):
    base, refiner = models
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    argv = [str(refiner) if a == "REFINER" else str(tmp_path / "img.png") if a == "IMG" else a for a in argv]
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--out", tmp_path / "o", *FAST, *argv], capsys)
    assert code == 2 and message in err, err


def test_replacement_vae(models, tmp_path, capsys):
    base, _ = models
    # the model's own VAE given as a folder: the same image
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--out", tmp_path / "own", *FAST], capsys)
    assert code == 0, err
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--vae", base / "vae", "--out", tmp_path / "folder",
                                       *FAST], capsys)
    assert code == 0, err
    assert np.array_equal(image(tmp_path / "own")[0], image(tmp_path / "folder")[0])
    # another VAE as one fp16 file with diffusers keys: another decoder, another image
    sd = {k: (v * 1.1).half() if k.startswith("decoder.conv_out") else v.half()
          for k, v in load_file(str(base / "vae" / "diffusion_pytorch_model.safetensors")).items()}
    save_file(sd, str(tmp_path / "fixed.safetensors"))
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--vae", tmp_path / "fixed.safetensors",
                                       "--out", tmp_path / "file", *FAST], capsys)
    assert code == 0, err
    assert "VAE from" in err
    assert not np.array_equal(image(tmp_path / "own")[0], image(tmp_path / "file")[0])
    code, err = run_cli(txt2img.main, ["a cat", "--model", base, "--vae", tmp_path / "nothing.safetensors",
                                       "--out", tmp_path / "x", *FAST], capsys)
    assert code == 2 and "--vae" in err and "not found" in err
