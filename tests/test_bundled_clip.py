"""The bundled CLIP (ldm/assets/clip-emoji): loads offline through open_clip, is ldm-eval's default, knows colours."""
import json

import pytest
import torch
from PIL import Image, ImageDraw

from ldm.cli.eval import main as eval_main
from ldm.eval.clip_score import BUNDLED_CLIP, ClipModel
from ldm.train.clip_loop import load_clip

COLOURS = {"red": (221, 46, 68), "blue": (85, 172, 238), "green": (120, 177, 89), "yellow": (253, 203, 88)}


def _disc(rgb) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 58, 58), fill=rgb)
    return image


@pytest.fixture(scope="module")
def clip():
    return ClipModel.bundled()


def test_export_loads_through_open_clip_factory():
    model = load_clip(BUNDLED_CLIP / "clip-emoji.json", BUNDLED_CLIP / "clip-emoji.safetensors")
    assert model.visual.image_size == (64, 64)
    assert model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 128)


def test_bundled_is_the_default_and_says_so(clip):
    assert ClipModel(None, None).name == clip.name == "clip:clip-emoji:clip-emoji.safetensors"
    assert "bundled" in clip.describe() and not clip.random_weights


def test_it_tells_colours_apart(clip):
    names = list(COLOURS)
    texts = clip.encode_texts([f"an emoji of a {c} circle, twemoji style" for c in names])
    images = torch.stack([clip.prepare(_disc(COLOURS[c])) for c in names])
    with torch.no_grad():
        sim = torch.nn.functional.normalize(clip(images), dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    assert sim.argmax(dim=1).tolist() == list(range(len(names)))  # each disc picks its own colour word


@pytest.mark.slow
def test_ldm_eval_images_offline_with_no_clip_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, ref = tmp_path / "imgs", tmp_path / "ref"
    folder.mkdir(), ref.mkdir()
    rows = []
    for i, c in enumerate(COLOURS):
        _disc(COLOURS[c]).save(folder / f"{i}.png")
        _disc(COLOURS[c]).rotate(90).save(ref / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"an emoji of a {c} circle, twemoji style"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    assert eval_main(["--images", str(folder), "--ref", str(ref), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["clip"] == "clip:clip-emoji:clip-emoji.safetensors" and "bundled" in report["clip_model"]
    assert report["distance"] == "fd_clip" and report["fd_clip"] is not None and report["fid"] is None
    assert any("not comparable with FID" in note for note in report["notes"])
    assert report["clip_score"] > 0
