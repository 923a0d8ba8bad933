"""The bundled default model (ldm/assets/default-model) loads and generates what ldm-txt2img promises."""
import numpy as np
import pytest

from ldm.pipeline.default_model import BUNDLED, default_model_path

pytestmark = pytest.mark.skipif(not (BUNDLED / "config.yaml").is_file(), reason="no bundled model in this checkout")


@pytest.mark.slow
def test_bundled_model_is_the_default_and_generates_64px_emoji():
    from ldm import load_pipeline

    assert default_model_path() == BUNDLED
    pipe = load_pipeline(device="cpu")
    assert pipe.default_size == 64
    a = pipe("an emoji of a red apple, twemoji style", seed=0, steps=4)
    b = pipe("an emoji of a red apple, twemoji style", seed=0, steps=4)
    c = pipe("an emoji of a blue car, openmoji style", seed=0, steps=4)
    assert a[0].size == (64, 64)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # The prompt reaches the image: same noise, different text, different picture.
    diff = np.abs(np.asarray(a[0], dtype=float) - np.asarray(c[0], dtype=float)).mean()
    assert diff > 5.0


def test_text_encoder_is_the_bundled_clip_text_tower():
    from safetensors.torch import load_file

    from ldm import load_pipeline
    from ldm.eval.clip_score import BUNDLED_CLIP

    assert not (BUNDLED / "text_encoder.safetensors").exists()  # shared with the CLIP, not a copy
    pipe = load_pipeline(device="cpu")
    clip = load_file(str(BUNDLED_CLIP / "clip-emoji.safetensors"))
    mine = pipe.text_encoder.state_dict()
    assert mine["model.token_embedding.weight"].float().equal(clip["token_embedding.weight"].float())
    assert mine["model.transformer.resblocks.0.attn.in_proj_weight"].float().equal(
        clip["transformer.resblocks.0.attn.in_proj_weight"].float())


@pytest.mark.slow
def test_colour_words_come_through():
    from ldm import load_pipeline

    pipe = load_pipeline(device="cpu")
    means = {}
    for colour in ("red", "blue"):
        image = pipe(f"an emoji of a {colour} square, twemoji style", seed=0, steps=12, guidance=5)[0]
        means[colour] = np.asarray(image, dtype=float).reshape(-1, 3).mean(0)
    assert means["red"][0] > means["red"][2] + 40  # red channel well above blue
    assert means["blue"][2] > means["blue"][0] + 40


def test_the_bundled_model_samples_with_its_own_defaults_where_none_are_given():
    """Its config's stage section: 25 DPM-Solver++(2M) steps at guidance 5, what docs/default-model.md measures."""
    from ldm import load_pipeline

    pipe = load_pipeline(device="cpu")
    s = pipe.settings()
    assert (s.steps, s.guidance, s.sampler) == (25, 5.0, "dpmpp_2m")
    assert pipe.settings(steps=10, guidance=2.0).steps == 10  # a given value wins
    assert not pipe.stage.pixel and pipe.stage.threshold_percentile() is None  # a latent model: no thresholding
