"""ldm's own open_clip text tower and CLIP BPE tokenizer: the same ids and embeddings as open_clip, no open_clip import."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import OPENCLIP, assert_close_to_ref, open_clip_text, realistic_weights, subprocess_env

from ldm.io.formats import load_model
from ldm.models.openclip_text import OpenCLIPTextTower, fits_tower
from ldm.models.text_encoders import OpenCLIPTextEncoder, TextEncoderConfig, build_openclip_model, build_text_encoder
from ldm.models.tokenizers import BPETokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "Héllo   WORLD 3.14 it's naïve café 東京",
           "an emoji of a 🍎, twemoji style!!", "Tom &amp; Jerry's   <start_of_text> x <end_of_text>", "don't\tstop\n",
           "mmmmmmmmmmmmmmmmmmmm...??? 12345 #hashtag @user", "ﬁne ﬂower — “quoted” ½ ÆØÅ ß ğ Ω", " \u200b zero width"]
LONG = " ".join(["cat"] * 75 + ["zebra", "giraffe"])  # 77 one-token words: the last two do not fit


@pytest.fixture(scope="module")
def reference_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def test_bpe_tokenizer_gives_open_clips_ids(reference_tokenizer):
    ours = BPETokenizer()
    for text in PROMPTS + [LONG]:
        assert ours.encode(text) == reference_tokenizer.encode(text), text
        assert ours.decode(ours.encode(text)) == reference_tokenizer.decode(reference_tokenizer.encode(text))
    for length in (77, 40, 8):  # a cut text keeps <end_of_text> as its last id
        assert torch.equal(ours(PROMPTS + [LONG], length), reference_tokenizer(PROMPTS + [LONG], length))
    assert (ours.vocab_size, ours.sot_token_id, ours.eot_token_id) == (49408, 49406, 49407)


def test_tower_has_open_clips_keys_and_gives_its_embeddings():
    cfg = {**OPENCLIP, "text_cfg": {**OPENCLIP["text_cfg"], "heads": 4}, "quick_gelu": True}  # 4 heads: a split shows
    assert fits_tower(cfg) and not fits_tower({"name": "ViT-H-14"})
    assert not fits_tower({**cfg, "text_cfg": {**cfg["text_cfg"], "ls_init_value": 1e-4}})  # open_clip builds those
    tower = realistic_weights(OpenCLIPTextTower.from_config(cfg))
    clip = open_clip_text(cfg, tower.state_dict())  # strict: the same names and shapes as open_clip's CLIP
    assert tower.state_dict().keys() == clip.state_dict().keys()
    for layer in ("penultimate", "last"):
        ours, theirs = (OpenCLIPTextEncoder(model, layer=layer).encode(PROMPTS) for model in (tower, clip))
        assert_close_to_ref(ours.tokens, theirs.tokens, what=f"{layer} tokens")
        assert_close_to_ref(ours.pooled, theirs.pooled, what=f"{layer} pooled")
    ids = BPETokenizer()(PROMPTS)
    with torch.no_grad():
        assert_close_to_ref(OpenCLIPTextEncoder(tower, layer="last").encode(PROMPTS).pooled, clip.encode_text(ids))


def test_build_picks_the_tower_for_plain_configs_and_open_clip_for_named_ones():
    encoder = build_text_encoder(TextEncoderConfig(type="openclip", open_clip=OPENCLIP))
    assert isinstance(encoder.model, OpenCLIPTextTower)
    named = build_openclip_model({"name": "RN50", "text_cfg": {**OPENCLIP["text_cfg"], "layers": 1}})
    assert type(named).__module__.startswith("open_clip")


def test_the_bundled_model_encodes_as_open_clip_on_its_own_weights():
    parts = load_model(ROOT / "ldm" / "assets" / "default-model")
    encoder = parts.text_encoder
    assert isinstance(encoder.model, OpenCLIPTextTower)
    config = parts.config["text_encoder"]
    dtype = encoder.model.token_embedding.weight.dtype  # as stored (float16): both compute in it
    clip = open_clip_text(config["open_clip"], encoder.model.state_dict()).to(dtype)
    reference = OpenCLIPTextEncoder(clip, layer=encoder.layer, max_length=encoder.max_length)
    prompts = ["an emoji of a yellow heart, noto emoji style", "an emoji of a smiling face with sunglasses", ""]
    ours, theirs = encoder.encode(prompts), reference.encode(prompts)
    assert_close_to_ref(ours.tokens, theirs.tokens, what="tokens")
    assert_close_to_ref(ours.pooled, theirs.pooled, what="pooled")


def test_loading_the_default_model_imports_neither_open_clip_nor_torchvision():
    code = ("import sys; from ldm import load_pipeline; load_pipeline(device='cpu'); "
            "print(sorted(m for m in ('open_clip', 'torchvision', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
