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
