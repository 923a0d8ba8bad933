"""`ldm-eval --num-processes 2` (accelerate launch, gloo on the CPU) gives the 1-process images and scores, whatever
the batch size: image i's noise depends on (seed, i) only, and the ranks' feature moments are merged in float64."""
import json
import os
import sys

import pytest
from helpers import SEED, write_images

from ldm.cli.eval import main

pytestmark = pytest.mark.slow


def _argv(model, clip, prompts, ref, out, batch_size):
    return ["--model", str(model), "--prompts", str(prompts), "--samplers", "euler_a", "--steps", "2", "--guidance",
            "3", "--height", "16", "--width", "16", "--n-per-prompt", "2", "--seed", str(SEED), "--clip-model",
            str(clip), "--clip-pretrained", "none", "--ref", str(ref), "--distance", "fd_clip", "--kid",
            "--precision-recall", "--device", "cpu", "--batch-size", str(batch_size), "--out", str(out)]


def test_two_processes_and_two_batch_sizes_give_the_one_process_images_and_scores(tiny_sd_folder, tiny_clip_config,
                                                                                  tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("id\tcaption\n1\ta red circle\n2\ta blue square\n3\ta green triangle\n4\ta red square\n"
                       "5\ta small dot\n")
    ref = write_images(tmp_path / "ref", seed=SEED, sizes=((16, 16),) * 12)
    one = tmp_path / "one"
    assert main(_argv(tiny_sd_folder, tiny_clip_config, prompts, ref, one, 1)) == 0
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the launched processes import this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    two = tmp_path / "two"
    assert main(["--num-processes", "2", *_argv(tiny_sd_folder, tiny_clip_config, prompts, ref, two, 3)]) == 0

    a, b = (json.loads((out / "report.json").read_text()) for out in (one, two))
    assert a["processes"] == 1 and b["processes"] == 2
    assert (a["generation"]["images"], a["generation"]["processes"]) == (10, 1)
    assert (b["generation"]["images"], b["generation"]["processes"]) == (10, 2)  # all ranks' images, one clock
    folder_a, folder_b = (out / "samples" / "euler_a-steps2-cfg3" for out in (one, two))
    names = sorted(p.name for p in folder_a.glob("*.png"))
    assert len(names) == 10 and names == sorted(p.name for p in folder_b.glob("*.png"))
    for name in names:  # the same pixels (and the same records) in every file
        assert (folder_a / name).read_bytes() == (folder_b / name).read_bytes(), name
    assert (folder_a / "metadata.jsonl").read_text() == (folder_b / "metadata.jsonl").read_text()
    # Scores: per image the same features; FD_CLIP from moments merged in another order (float64 round-off only).
    assert a["fd_clip"] > 0 and b["fd_clip"] == pytest.approx(a["fd_clip"], rel=1e-9)
    assert b["kid_clip"]["mean"] == pytest.approx(a["kid_clip"]["mean"], rel=1e-9, abs=1e-12)
    assert b["precision_recall"] == a["precision_recall"]
    assert [r["clip_score"] for r in b["per_image"]] == pytest.approx([r["clip_score"] for r in a["per_image"]],
                                                                      rel=1e-9, abs=1e-12)
    assert a["protocol"] == b["protocol"]
    assert a["protocol"].startswith("10 images at 16x16; FD_CLIP against") and "12 images" in a["protocol"]
