"""Prompt sets, image grids and the in-training evaluation hook."""


import numpy as np
import pytest
from PIL import Image

from ldm.errors import LdmError
from ldm.eval.clip_score import clip_score
from ldm.eval.features import compute_features
from ldm.eval.frechet import GaussianStats, fid, stats_from_features
from ldm.eval.grid import PAD, make_grid
from ldm.eval.in_training import evaluate_generations
from ldm.eval.prompts import Prompt, load_prompts


def test_txt_prompts_skip_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a header\na red cube\n\n   \n  two cats  \n#another\n")
    assert load_prompts(path) == [Prompt("a red cube"), Prompt("two cats")]


def test_jsonl_prompts_keep_categories_and_report_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a red cube", "category": "colours"}\n\n{"text": "x"}\n')
    assert load_prompts(path) == [Prompt("a red cube", "colours"), Prompt("x", None)]
    path.write_text('{"text": "ok"}\n{"caption": "no text field"}\n')
    with pytest.raises(LdmError, match='p.jsonl:2: .*"text"'):
        load_prompts(path)
    with pytest.raises(LdmError, match="no such file, nor a bundled set"):
        load_prompts(tmp_path / "missing.txt")


def test_bundled_prompt_set_has_five_balanced_categories():
    prompts = load_prompts("ldm_eval_v1")
    counts = {c: sum(p.category == c for p in prompts) for c in {p.category for p in prompts}}
    assert counts == {"objects": 12, "counts": 12, "colours": 12, "positions": 12, "styles": 12}
    assert len({p.text for p in prompts}) == 60


def test_make_grid_places_images_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (8, 6), c) for c in colours]
    grid = make_grid(images, ncols=2)
    assert grid.size == (2 * 8 + 3 * PAD, 2 * 6 + 3 * PAD)
    assert grid.getpixel((PAD, PAD)) == colours[0]
    assert grid.getpixel((2 * PAD + 8, PAD)) == colours[1]
    assert grid.getpixel((PAD, 2 * PAD + 6)) == colours[2]
    assert grid.getpixel((2 * PAD + 8, 2 * PAD + 6)) == (255, 255, 255)  # empty cell
    captioned = make_grid(images, ncols=3, captions=["red", "green", "a long blue caption " * 5])
    assert captioned.height > 6 + 2 * PAD and captioned.getpixel((PAD + 16 + 2 * PAD, PAD)) == colours[2]
    dark = np.asarray(captioned)[PAD + 6 :, :, :].min(axis=2) < 128  # caption text drawn below the images
    assert dark.any()
    with pytest.raises(LdmError, match="3 images but 2 captions"):
        make_grid(images, 2, captions=["a", "b"])


def test_in_training_hook_scores_generations_and_returns_a_grid(tiny_clip):
    prompts = ["a red square", "a green square", "a blue square"]
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}

    def generate(texts):
        return [Image.new("RGB", (32, 32), colours[t.split()[1]]) for t in texts]

    ref_images = [Image.new("RGB", (32, 32), (i * 40, 100, 255 - i * 40)) for i in range(4)]
    ref_feats = compute_features(ref_images, tiny_clip, progress=False).values
    ref_stats = stats_from_features(ref_feats, extractor=tiny_clip.name)
    metrics, grid = evaluate_generations(generate, prompts, tiny_clip, ref_stats=ref_stats, ncols=3)
    feats = compute_features(generate(prompts), tiny_clip, progress=False).values
    expected_clip = clip_score(feats, tiny_clip.encode_texts(prompts)).mean().item()
    assert metrics["clip_score"] == pytest.approx(expected_clip, rel=1e-5, abs=1e-4)
    assert metrics["fd_clip"] == pytest.approx(fid(stats_from_features(feats), ref_stats), rel=1e-6)
    assert metrics["fd_clip"] > 0 and "fid" not in metrics
    assert grid.width == 3 * 32 + 4 * PAD and grid.getpixel((PAD, PAD)) == colours["red"]
    inception_stats = GaussianStats(np.zeros(2048), np.eye(2048))  # a pytorch-fid file: needs an Inception extractor
    with pytest.raises(LdmError, match="need fid_extractor"):
        evaluate_generations(generate, prompts, tiny_clip, ref_stats=inception_stats)
    with pytest.raises(LdmError, match="returned 2 images for 3 prompts"):
        evaluate_generations(lambda t: generate(t)[:2], prompts, tiny_clip)
