"""ldm-eval --model: generate a sweep with the real pipeline, then score every setting."""
import json

import pytest

from ldm.cli.eval import main


def test_generate_sweep_then_score(tiny_sd_folder, tiny_clip_config, tmp_path):
    model, clip = tiny_sd_folder, tiny_clip_config
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "eval"
    code = main(["--model", str(model), "--prompts", str(prompts), "--samplers", "euler,ddim", "--steps", "2",
                 "--guidance", "1,3", "--height", "16", "--width", "16", "--clip-model", str(clip),
                 "--clip-pretrained", "none", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    runs = report["runs"]
    assert len(runs) == 4  # 2 samplers x 2 guidance scales
    for run in runs:
        assert len(run["per_image"]) == 2
        assert {r["text"] for r in run["per_image"]} == {"a red circle", "a blue square"}
        scores = [r["clip_score"] for r in run["per_image"]]
        assert all(0.0 <= s <= 100.0 for s in scores)
        assert abs(run["clip_score"] - sum(scores) / len(scores)) < 1e-6
        speed = run["generation"]  # the generation's own time, for throughput on N processes
        assert speed["images"] == 2 and speed["processes"] == 1 and speed["seconds"] > 0
        assert speed["images_per_s"] == pytest.approx(2 / speed["seconds"], rel=1e-3)  # rounded to 1e-6 each
    assert (out / "index.html").is_file()
    assert len(report["per_image"]) == 8 and len(report["settings"]) == 4


def test_reference_of_another_feature_space_fails_before_generating(tiny_sd_folder, tiny_clip_config, tmp_path, capsys,
                                                                     monkeypatch):
    import numpy as np

    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached Inception weights
    model, clip = tiny_sd_folder, tiny_clip_config
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")  # two images: a covariance (one is refused first)
    ref = tmp_path / "inception_stats.npz"  # a pytorch-fid file: Inception statistics, no extractor name
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    out = tmp_path / "eval"
    code = main(["--model", str(model), "--prompts", str(prompts), "--steps", "2", "--height", "16", "--width", "16",
                 "--clip-model", str(clip), "--clip-pretrained", "none", "--ref", str(ref), "--out", str(out)])
    assert code == 2
    assert "Inception" in capsys.readouterr().err
    assert not (out / "samples").exists()  # nothing was generated


def test_scoring_existing_images_reports_no_generation_time(tiny_sd_folder, tiny_clip_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_sd_folder), "--prompts", str(prompts), "--steps", "2", "--guidance", "1",
            "--height", "16", "--width", "16", "--clip-model", str(tiny_clip_config), "--clip-pretrained", "none"]
    assert main([*argv, "--out", str(out)]) == 0
    again = tmp_path / "again"  # the same images, scored from the folder: nothing was generated, so no time
    assert main(["--images", str(next((out / "samples").iterdir())),
                 "--clip-model", str(tiny_clip_config), "--clip-pretrained", "none", "--out", str(again)]) == 0
    assert json.loads((again / "report.json").read_text())["generation"] is None
