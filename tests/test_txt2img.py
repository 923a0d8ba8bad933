"""ldm-txt2img and the Python API on a tiny random native model: outputs, metadata, modes and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_tiny_sd

from ldm.cli.txt2img import main
from ldm.pipeline import load_pipeline
from ldm.pipeline.images import read_png_parameters

@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return load_pipeline(tiny_sd_folder, device="cpu")


def run(argv):
    return main([str(a) for a in argv])


def test_cli_writes_pngs_and_imagefolder_metadata(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    code = run(["--prompts", prompts, "--model", tiny_sd_folder, "--steps", 2, "--n", 2, "--height", 16, "--width", 16,
                "--sampler", "euler", "--seed", 5, "--guidance", 3, "--out", out])
    assert code == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [r["seed"] for r in records] == [5, 5, 6, 6]
    for r in records:
        assert {"file_name", "text", "seed", "sampler", "steps", "guidance", "model"} <= set(r)
        image = Image.open(out / r["file_name"])
        assert image.size == (16, 16)
        assert read_png_parameters(out / r["file_name"]) == r
    assert records[0]["sampler"] == "euler" and records[0]["steps"] == 2 and records[0]["guidance"] == 3.0


@pytest.mark.parametrize("argv, message", [
    (["x", "--sampler", "plms"], "unknown sampler"),
    (["x", "--steps", "0"], "positive"),
    (["x", "--height", "18"], "multiple"),
    (["x", "--model", "/nonexistent/model"], "nonexistent"),
])
def test_bad_input_exit_2_and_nothing_written(tiny_sd_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    if "--model" not in argv:
        argv = argv + ["--model", str(tiny_sd_folder)]
    assert run(argv + ["--out", out, "--steps" if "--steps" not in argv else "--n", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_same_seed_same_image_and_empty_prompt_allowed(pipe):
    a = pipe("a cat", seed=3, steps=2, height=16, width=16, sampler="ddim")[0]
    b = pipe("a cat", seed=3, steps=2, height=16, width=16, sampler="ddim")[0]
    c = pipe("a cat", seed=4, steps=2, height=16, width=16, sampler="ddim")[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert pipe("", seed=0, steps=1, height=16, width=16)[0].size == (16, 16)


def test_long_prompt_is_truncated_with_a_warning_naming_dropped_words(pipe):
    prompt = " ".join(["apple"] * 80 + ["zebra", "giraffe"])
    with pytest.warns(UserWarning, match="zebra giraffe"):
        pipe(prompt, seed=0, steps=1, height=16, width=16, guidance=1.0)


@pytest.mark.slow
def test_img2img_runs_the_strength_fraction_of_the_steps(pipe):
    init = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8"))
    seen = []
    pipe("a cat", init_image=init, strength=0.5, seed=0, steps=10, sampler="euler", height=16, width=16,
         callback=lambda info: seen.append(float(info["sigma"])))
    assert len(seen) == 5
    full = []
    pipe("a cat", seed=0, steps=10, sampler="euler", height=16, width=16, callback=lambda i: full.append(1))
    assert len(full) == 10


def test_inpainting_by_blending_keeps_the_unmasked_latent(pipe):
    init = Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype("uint8"))
    mask = np.zeros((16, 16), dtype="uint8")
    mask[:, 8:] = 255  # repaint the right half
    denoised = []
    pipe("a cat", init_image=init, mask_image=Image.fromarray(mask), strength=1.0, seed=0, steps=3, sampler="euler",
         height=16, width=16, guidance=1.0, callback=lambda info: denoised.append(info["denoised"]))
    from ldm.pipeline.images import from_pil

    known = pipe.autoencoder.encode_latents(from_pil(init), sample=False)
    last = denoised[-1]
    assert torch.allclose(last[..., :4], known[..., :4], atol=1e-5)  # left half (latent width 8 -> first 4 columns)
    assert not torch.allclose(last[..., 4:], known[..., 4:], atol=1e-2)


@pytest.mark.slow
def test_nine_channel_inpainting_checkpoint_gets_mask_and_masked_image(tmp_path):
    pipe = load_pipeline(write_tiny_sd(tmp_path / "inpaint", in_channels=9), device="cpu")
    seen = []
    original = pipe.unet.forward

    def spy(x, t, **kw):
        seen.append(x.shape[1])
        return original(x, t, **kw)

    pipe.unet.forward = spy
    init = Image.new("RGB", (16, 16), (200, 10, 10))
    mask = Image.new("L", (16, 16), 255)
    image = pipe("a cat", init_image=init, mask_image=mask, seed=0, steps=2, height=16, width=16)[0]
    assert image.size == (16, 16)
    assert seen and set(seen) == {9}
    seen.clear()  # strength < 1 runs that fraction of the steps (diffusers' inpainting rule), with the mask channels
    pipe("a cat", init_image=init, mask_image=mask, strength=0.5, seed=0, steps=4, height=16, width=16, guidance=1.0)
    assert seen == [9, 9]


@pytest.mark.slow
def test_cli_img2img_and_inpainting_record_their_inputs(tiny_sd_folder, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype("uint8")).save(init)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((16, 16), 255, dtype="uint8")).save(mask)
    out = tmp_path / "out"
    assert run(["a cat", "--model", tiny_sd_folder, "--init-image", init, "--strength", 0.5, "--steps", 4,
                "--height", 16, "--width", 16, "--out", out]) == 0
    assert run(["a cat", "--model", tiny_sd_folder, "--init-image", init, "--mask", mask, "--steps", 2,
                "--height", 16, "--width", 16, "--out", out]) == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert records[0]["init_image"] == str(init) and records[0]["strength"] == 0.5
    assert records[1]["mask_image"] == str(mask) and records[1]["strength"] == 1.0  # inpainting's default


@pytest.mark.parametrize("extra, message", [
    (["--init-image", "/nonexistent.png"], "image not found"),
    (["--mask", "/nonexistent.png"], "--mask needs --init-image"),
    (["--init-image", __file__], "cannot read image"),
])
def test_cli_bad_mode_inputs_exit_2_and_nothing_written(tiny_sd_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert run(["a cat", "--model", tiny_sd_folder, "--steps", 2, "--out", out, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_negative_prompt_guidance_rescale_and_wrappers_change_the_image(pipe):
    from functools import partial

    from ldm.diffusion.guidance import dynamic_threshold

    kw = dict(seed=1, steps=3, height=16, width=16, sampler="euler", guidance=6.0)
    base = np.asarray(pipe("a red circle", **kw)[0], dtype=float)
    negative = np.asarray(pipe("a red circle", "a blue square", **kw)[0], dtype=float)
    rescaled = np.asarray(pipe("a red circle", guidance_rescale=0.7, **kw)[0], dtype=float)
    thresholded = np.asarray(pipe("a red circle", wrappers=[partial(dynamic_threshold, percentile=0.5)], **kw)[0],
                             dtype=float)
    for other in (negative, rescaled, thresholded):
        assert np.isfinite(other).all() and np.abs(other - base).mean() > 0.1


def test_strength_that_leaves_no_step_exits_2_and_writes_nothing(tiny_sd_folder, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16), (10, 200, 10)).save(init)
    out = tmp_path / "out"
    assert run(["a cat", "--model", tiny_sd_folder, "--init-image", init, "--strength", 0.05, "--steps", 10,
                "--height", 16, "--width", 16, "--out", out]) == 2
    assert "leaves no step" in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_images_are_an_error_not_a_black_png():
    from ldm.errors import LdmError
    from ldm.pipeline.images import to_pil

    with pytest.raises(LdmError, match="NaN"):
        to_pil(torch.full((1, 3, 4, 4), float("nan")))
