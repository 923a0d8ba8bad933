"""CLIP score against open_clip itself; the ldm-eval command (folders, sweeps with a stand-in generator), its errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.cli.eval import main as eval_main
from ldm.errors import LdmError
from ldm.eval.clip_score import ClipModel, clip_score
from ldm.eval.features import compute_features
from ldm.eval.frechet import fid, stats_from_features
from ldm.pipeline.eval_images import image_record
from ldm.pipeline.images import save_png

from helpers import captioned_folder as _captioned_folder, patch_everywhere
from helpers import noisy_image as _image

TEXTS = ["a red cube", "two green spheres", 'a <b>bold</b> "quoted" & odd prompt', "a cat on a mat"]


def test_clip_score_is_100_times_clamped_open_clip_cosine(tiny_clip):
    images = [_image(i) for i in range(4)]
    feats = compute_features(images, tiny_clip, batch_size=3, progress=False)
    txt_emb = tiny_clip.encode_texts(TEXTS)
    scores = clip_score(feats.values, txt_emb)
    flipped = clip_score(feats.values, -txt_emb)  # random weights: cosines of either sign
    net = tiny_clip.net
    with torch.no_grad():
        img = F.normalize(net.encode_image(torch.stack([tiny_clip.preprocess(im) for im in images])), dim=-1)
        txt = F.normalize(net.encode_text(tiny_clip.tokenizer(TEXTS)), dim=-1)
    cos = (img * txt).sum(-1).double()
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(flipped, 100 * (-cos).clamp(min=0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores + flipped, 100 * cos.abs(), rtol=1e-5, atol=1e-4)
    assert (cos.abs() > 1e-3).all() and tiny_clip.dim == 16
    assert clip_score(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])).item() == 0  # negative cosine -> 0


def test_prompts_over_the_text_context_are_scored_on_their_first_tokens_and_reported(tiny_clip, tiny_clip_config,
                                                                                     tmp_path):
    """CLIP reads 77 tokens (start and end included): a longer prompt is cut to its first 75 words' tokens, as
    OpenAI's CLIP and torchmetrics do. It was cut silently: now a warning, per-image flags and a report note."""
    fits, over = "a " * 75, "a " * 76  # one token per "a": 75 + 2 = 77 fits, 76 + 2 does not
    assert tiny_clip.context_length == 77
    assert tiny_clip.truncated_prompts([fits, over, "a red cube", ""]) == [1]
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer than .* text context of 77 tokens"):
        emb = tiny_clip.encode_texts([fits, fits + "red cube on a blue mat"])
    torch.testing.assert_close(emb[0], emb[1])  # the cut prompt is its first 75 tokens, ended by the end token
    folder = _captioned_folder(tmp_path / "gen", ["a red cube", over + "in the rain"])
    with pytest.warns(UserWarning, match="longer than"):
        assert eval_main(["--images", str(folder), "--clip-model", str(tiny_clip_config), "--clip-pretrained", "none",
                          "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["truncated_prompts"] == 1 and [i.get("truncated", False) for i in report["per_image"]] == [False, True]
    assert any("1 prompt(s) are longer than the CLIP text context (77 tokens)" in n for n in report["notes"])


def test_eval_images_writes_report_html_and_plot(tiny_clip_config, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights anywhere: FD_CLIP instead
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = _captioned_folder(tmp_path / "gen", TEXTS)
    ref = _captioned_folder(tmp_path / "ref", ["x"] * 3, seed=10)
    out = tmp_path / "out"
    assert (
        eval_main(
            [
                "--images",
                str(images),
                "--ref",
                str(ref),
                "--kid",
                "--clip-model",
                str(tiny_clip_config),
                "--clip-pretrained",
                "none",
                "--out",
                str(out),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["clip_model"] == {"name": str(tiny_clip_config), "pretrained": "none", "random_weights": True}
    assert any("random weights" in n for n in report["notes"]) and any(
        "FD_CLIP instead of FID" in n for n in report["notes"]
    )
    assert report["distance"] == "fd_clip" and report["fid"] is None and len(report["runs"]) == 1
    per_image = report["per_image"]
    assert [p["file_name"] for p in per_image] == [f"img {i}.png" for i in range(4)]
    assert [p["text"] for p in per_image] == TEXTS
    # the numbers equal an independent computation with the same model
    feats = compute_features([images / f"img {i}.png" for i in range(4)], tiny_clip, progress=False)
    expected = clip_score(feats.values, tiny_clip.encode_texts(TEXTS))
    np.testing.assert_allclose([p["clip_score"] for p in per_image], expected.numpy(), rtol=1e-5, atol=1e-4)
    assert report["clip_score"] == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-4)
    ref_feats = compute_features(sorted(ref.glob("*.png")), tiny_clip, progress=False).values
    expected_fd = fid(stats_from_features(feats.values), stats_from_features(ref_feats))
    assert report["fd_clip"] == pytest.approx(expected_fd, rel=1e-6) and report["fd_clip"] > 0
    assert set(report["kid_clip"]) == {"mean", "std"}
    html = (out / "index.html").read_text()
    assert "a &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &amp; odd prompt" in html and "<b>bold" not in html
    assert "src='../gen/img%200.png'" in html and (out / "../gen/img 0.png").is_file()
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries


def test_eval_sweep_calls_generator_once_per_setting(tiny_clip_config, tmp_path, monkeypatch):
    calls = []

    def generate_images(pipe, planned, folder, generation, settings, *, batch_size, negative_prompt=None, rank=0,
                        world=1, progress=True):
        calls.append(dict(model=pipe, sampler=generation["sampler"], steps=generation["steps"],
                          guidance=generation["guidance"], seed=settings["base_seed"], n=len(planned)))
        for p in planned:
            save_png(_image(int(generation["guidance"] * 10) + p.index), folder / p.file_name,
                     image_record(p, settings, negative_prompt))

    patch_everywhere(monkeypatch, "ldm.pipeline.eval_images.generate_images", generate_images)
    patch_everywhere(monkeypatch, "ldm.pipeline.eval_images.check_batch_fits", lambda pipe, batch_size, **kw: None)
    patch_everywhere(monkeypatch, "ldm.pipeline.generate.check_generation", lambda pipe, **settings: None)
    loads = []
    patch_everywhere(monkeypatch, "ldm.pipeline.load.load_pipeline", lambda model, **kw: loads.append(model) or f"loaded:{model}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "a red cube", "category": "colours"}\n{"text": "three cats", "category": "counts"}\n')
    ref = _captioned_folder(tmp_path / "ref", ["x"] * 3, seed=10)
    out = tmp_path / "out"
    assert (
        eval_main(
            [
                "--model",
                "my-model",
                "--prompts",
                str(prompts),
                "--samplers",
                "euler,heun",
                "--steps",
                "4",
                "--guidance",
                "1",
                "3.5",
                "--ref",
                str(ref),
                "--distance",
                "fd_clip",
                "--clip-model",
                str(tiny_clip_config),
                "--clip-pretrained",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert [(c["sampler"], c["guidance"]) for c in calls] == [
        ("euler", 1.0),
        ("euler", 3.5),
        ("heun", 1.0),
        ("heun", 3.5),
    ]
    # the model is loaded once for the whole sweep, and that pipeline is handed to every setting
    assert loads == ["my-model"]
    assert all(c["model"] == "loaded:my-model" and c["steps"] == 4 and c["n"] == 2 for c in calls)
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 4  # a sweep: one entry per setting, and the same fields at the top level as lists
    assert [s["guidance"] for s in report["settings"]] == [1.0, 3.5, 1.0, 3.5]
    assert report["clip_score"] == [r["clip_score"] for r in report["runs"]]
    assert len(report["per_image"]) == 8 and {i["sampler"] for i in report["per_image"]} == {"euler", "heun"}
    run = report["runs"][1]
    assert run["settings"]["sampler"] == "euler" and run["settings"]["guidance"] == 3.5
    assert (out / "samples" / "euler-steps4-cfg3.5" / "000000-a-red-cube.png").is_file()
    assert [p["category"] for p in run["per_image"]] == ["colours", "counts"]
    assert report["runs"][0]["fd_clip"] != report["runs"][1]["fd_clip"]  # different images per guidance
    html = (out / "index.html").read_text()
    assert html.count("<h2>") == 4 and "sampler=heun, steps=4, guidance=3.5" in html
    assert "src='samples/heun-steps4-cfg3.5/000001-three-cats.png'" in html
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case", ["no_metadata", "empty", "unreadable", "no_pretrained", "bad_tag"])
def test_eval_bad_input_exits_2_with_clear_message(case, tiny_clip_config, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    clip = ["--clip-model", str(tiny_clip_config), "--clip-pretrained", "none"]
    args = ["--images", str(folder), *clip, "--out", str(tmp_path / "out")]
    expected = {
        "no_metadata": "no metadata.jsonl",
        "empty": "no images listed",
        "unreadable": "img 1.png: cannot read image",
        "no_pretrained": "choose the CLIP weights with --clip-pretrained",
        "bad_tag": "neither a file nor a known tag",
    }[case]
    if case == "no_metadata":
        _image(0).save(folder / "a.png")
    elif case == "empty":
        (folder / "metadata.jsonl").write_text("\n")
    elif case == "unreadable":
        _captioned_folder(folder, ["a", "b"])
        (folder / "img 1.png").write_bytes(b"garbage")
    elif case == "no_pretrained":
        _captioned_folder(folder, ["a"])  # a valid folder: the metadata is read before the CLIP model loads
        args = ["--images", str(folder), "--clip-model", str(tiny_clip_config), "--out", str(tmp_path / "out")]
    elif case == "bad_tag":
        _captioned_folder(folder, ["a"])
        args = [
            "--images",
            str(folder),
            "--clip-model",
            str(tiny_clip_config),
            "--clip-pretrained",
            "openai",
            "--out",
            str(tmp_path / "out"),
        ]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expected in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_offline_openai_tag_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LdmError, match="cannot load CLIP ViT-B-32 weights 'openai'.*local weights file"):
        ClipModel("ViT-B-32", "openai")
