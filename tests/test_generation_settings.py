"""Settings are checked in one place: pipe(), generate_to_folder and ldm-txt2img refuse the same input alike."""
import pytest
from PIL import Image

from ldm.cli.txt2img import main
from ldm.errors import LdmError
from ldm.pipeline import load_pipeline
from ldm.pipeline.generate import generate_to_folder
from helpers import run_cli, write_tiny_sd

BAD = [  # (keyword arguments, CLI flags, the message)
    (dict(guidance=float("nan")), ["--guidance", "nan"], "--guidance must be a finite number"),
    (dict(guidance=float("inf")), ["--guidance", "inf"], "--guidance must be a finite number"),
    (dict(steps=1001), ["--steps", "1001"], "cannot sample 1001 steps with dpmpp_2m .* lie in \\[1, 1000\\]"),
    (dict(height=18), ["--height", "18"], "--height 18 is not a positive multiple of the model's factor 4"),
    (dict(guidance_rescale=2.0), ["--guidance-rescale", "2"], "--guidance-rescale must lie in \\[0, 1\\]"),
    (dict(strength=0.5), ["--strength", "0.5"], "--strength applies to img2img and inpainting"),
    (dict(guidance=-7.5), ["--guidance", "-7.5"], "--guidance -7.5 is negative: a guidance scale is 0 or more, and the "
                                                  "smallest meaningful values are 0 and 1"),
    (dict(sampler="ddim", sampler_options={"eta": -1.0}), ["--sampler", "ddim", "--sampler-option", "eta=-1"],
     r"sampler option eta=-1 is out of range: eta lies in \[0, inf\)"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(model_dir, device="cpu")


@pytest.mark.parametrize("kwargs, flags, message", BAD, ids=["nan-guidance", "inf-guidance", "too-many-steps",
                                                              "height", "rescale", "strength-without-image",
                                                              "negative-guidance", "negative-eta"])
def test_every_door_refuses_bad_settings_before_any_work(pipe, model_dir, tmp_path, capsys, kwargs, flags, message):
    with pytest.raises(LdmError, match=message):
        pipe("a cat", **kwargs)
    out = tmp_path / "out"
    with pytest.raises(LdmError, match=message):
        generate_to_folder(pipe, ["a cat"], out, progress=False, **kwargs)
    assert not out.exists()
    code, err = run_cli(main, ["a cat", "--model", model_dir, "--out", out, *flags], capsys)  # argparse exits 2 too
    assert code == 2 and message.split(" ")[0] in err
    assert not out.exists()


def test_img2img_strength_is_checked_alike(pipe, tmp_path):
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    for strength, message in ((0.0, "--strength must lie in \\(0, 1\\]"), (1.5, "--strength must lie in"),
                              (0.05, "leaves no step to run")):
        with pytest.raises(LdmError, match=message):
            pipe("a cat", init_image=image, strength=strength, steps=10, height=16, width=16)
        path = tmp_path / "init.png"
        image.save(path)
        with pytest.raises(LdmError, match=message):
            generate_to_folder(pipe, ["a cat"], tmp_path / "out", init_image=path, strength=strength, steps=10,
                               height=16, width=16, progress=False)


def test_sampler_options_reach_the_sampler_and_unknown_ones_name_what_it_takes(pipe):
    kw = dict(steps=3, height=16, width=16, guidance=1.0, seed=2, sampler="ddim")
    plain = pipe("a cat", **kw)[0]
    noisy = pipe("a cat", sampler_options={"eta": 1.0}, **kw)[0]
    assert plain.tobytes() != noisy.tobytes()  # DDIM with eta 1 adds fresh noise at each step
    assert pipe("a cat", eta=1.0, **kw)[0].tobytes() == noisy.tobytes()  # `eta` is the same option
    with pytest.raises(LdmError, match="unknown sampler option .eta.; sampler .euler. takes s_churn"):
        pipe("a cat", **{**kw, "sampler": "euler"}, sampler_options={"eta": 1.0})


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=512 / 32), r"--height must be an integer, got 16.0 \(512 / 2 is a float: use 512 // 2\)"),
    (dict(n="2"), "--n must be an integer, got '2'"),
    (dict(guidance="7.5"), "--guidance must be a number, got '7.5'"),
], ids=["float-height", "string-n", "string-guidance"])
def test_python_callers_get_a_clear_error_for_values_of_the_wrong_type(pipe, kwargs, message):
    with pytest.raises(LdmError, match=message):
        pipe("a cat", steps=1, **kwargs)


def test_a_prompt_that_is_not_a_string_is_refused_not_generated_as_one_image(pipe):
    """A list given to pipe() used to be tokenized as one prompt: one image came back for two prompts."""
    for prompt, negative in ((["a cat", "a dog"], None), (None, None), ("a cat", ["blurry"])):
        with pytest.raises(LdmError, match=r"a prompt is a string, got (list|NoneType).*use pipe.batch\(prompts, seeds\)"):
            pipe(prompt, negative, steps=1, height=16, width=16)
    assert len(pipe.batch(["a cat", "a dog"], [0, 1], steps=1, height=16, width=16)) == 2  # the way to do it


def test_load_cascade_takes_one_upscaler_path_as_a_single_stage(model_dir):
    from ldm.pipeline.cascade import load_cascade

    # A string used to be iterated character by character ("/: a folder that is neither ...").
    with pytest.raises(LdmError, match=rf"--upscaler {model_dir}: a latent model cannot be an upscaler"):
        load_cascade(model_dir, str(model_dir), device="cpu")


def test_batch_seeds_are_checked_like_the_seed():
    """`pipe.batch(prompts, seeds)`: one seed per prompt, each an integer in a generator's range (not a bool)."""
    from ldm.pipeline.settings import SEED_RANGE, check_batch_seeds

    check_batch_seeds(["a", "b"], [0, SEED_RANGE[1]])
    for seeds, message in (([0], "2 prompts but 1 seeds"), ([0, SEED_RANGE[1] + 1], "out of range"),
                           ([0, True], "must be an integer, got True"), ([0, 1.5], "must be an integer")):
        with pytest.raises(LdmError, match=message):
            check_batch_seeds(["a", "b"], seeds)


def test_a_mistyped_setting_names_the_settings():
    """`pipe("a cat", step=20)` (for steps): an LdmError listing the settings, not the constructor's TypeError."""
    from ldm.pipeline.settings import GenerationSettings

    with pytest.raises(LdmError, match=r"unknown generation setting\(s\) 'step'; the settings are .*steps"):
        GenerationSettings.from_call({"step": 20})
    assert GenerationSettings.from_call({"steps": 20}).steps == 20


def test_guidance_0_and_1_are_the_smallest_scales_and_both_turn_guidance_off(pipe):
    """As in diffusers, a scale up to 1 samples the conditional model alone: 0, 0.5 and 1 give the same image. A
    negative scale would be the same again, which is why it is refused as the typo it almost always is."""
    kw = dict(steps=2, height=16, width=16, seed=1)
    off = pipe("a cat", guidance=1.0, **kw)[0].tobytes()
    assert pipe("a cat", guidance=0, **kw)[0].tobytes() == off
    assert pipe("a cat", guidance=0.5, **kw)[0].tobytes() == off
    assert pipe("a cat", guidance=3.0, **kw)[0].tobytes() != off  # above 1 it guides
    for scale, message in ((-1, "--guidance -1 is negative"), (-0.0001, "--guidance -0.0001 is negative"),
                           (float("-inf"), "--guidance must be a finite number, got -inf")):
        with pytest.raises(LdmError, match=message):
            pipe("a cat", guidance=scale, **kw)


def test_the_demo_page_refuses_negative_guidance_as_the_cli_does(pipe, tmp_path):
    """ldm-demo's Generator goes through generate_to_folder: the same check and message, and no folder is made."""
    from ldm.cli.demo_page import Generator

    generator = Generator(pipe, tmp_path / "demo")
    with pytest.raises(LdmError, match="--guidance -2 is negative: a guidance scale is 0 or more"):
        generator.generate("a cat", guidance=-2.0, steps=1, height=16, width=16)
    assert not (tmp_path / "demo").exists()


def test_check_guidance_names_the_option_and_every_settings_check_uses_it():
    """One rule for --guidance, --stage-guidance (ldm-txt2img checks it before loading) and each stage's settings."""
    from ldm.pipeline.settings import GenerationSettings, check_guidance, check_settings

    assert check_guidance(0) == 0 and check_guidance(7.5) == 7.5
    with pytest.raises(LdmError, match="--stage-guidance -4 is negative"):
        check_guidance(-4.0, "--stage-guidance")
    with pytest.raises(LdmError, match="--guidance -1 is negative"):
        check_settings(GenerationSettings(guidance=-1.0), factor=1, schedule_config=None)


def test_the_eta_keyword_is_held_to_etas_range(pipe):
    """`pipe(..., eta=-1)` (the shortcut for sampler_options={"eta": ...}) is refused with the value and the range."""
    with pytest.raises(LdmError, match=r"sampler option eta=-1 is out of range: eta lies in \[0, inf\).*sampler "
                                       r"'ddim' takes eta"):
        pipe("a cat", sampler="ddim", eta=-1, steps=1, height=16, width=16)
    assert pipe("a cat", sampler="ddim", eta=0, steps=1, height=16, width=16)[0].size == (16, 16)
