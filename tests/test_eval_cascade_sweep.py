"""`ldm-eval --upscaler SR --aug-levels ...`: a cascade evaluated at several noise-augmentation levels of its
super-resolution stage, one folder per level, each image the cascade's own image for its seed."""
import json

import numpy as np
import pytest
from PIL import Image
from helpers import stage_parts

from ldm.cli.eval import main
from ldm.io.native_format import save_native
from ldm.pipeline.cascade import load_cascade

pytestmark = pytest.mark.slow


def test_an_aug_level_sweep_of_a_cascade(tiny_clip_config, tmp_path, capsys):
    base = stage_parts("base")
    save_native(base, tmp_path / "base")
    save_native(stage_parts("sr", base.text_encoder), tmp_path / "sr")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "eval"
    argv = ["--model", tmp_path / "base", "--upscaler", tmp_path / "sr", "--aug-levels", "0,0.5", "--prompts", prompts,
            "--samplers", "ddim", "--steps", "2", "--guidance", "3", "--batch-size", "2", "--clip-model",
            tiny_clip_config, "--clip-pretrained", "none", "--out", out]
    assert main([str(a) for a in argv]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["settings"]["aug_level"] for r in report["runs"]] == [0.0, 0.5]
    folders = [out / "samples" / f"ddim-steps2-cfg3-aug{level}" for level in ("0", "0.5")]
    records = [json.loads((f / "metadata.jsonl").read_text().splitlines()[0]) for f in folders]
    assert [r["aug_level"] for r in records] == [0.0, 0.5] and records[0]["seed"] == records[1]["seed"]
    images = [np.asarray(Image.open(f / records[0]["file_name"])) for f in folders]
    assert images[0].shape == (32, 32, 3) and not np.array_equal(images[0], images[1])  # the level matters
    cascade = load_cascade(str(tmp_path / "base"), [str(tmp_path / "sr")], device="cpu")
    alone = np.asarray(cascade("a red circle", seed=records[0]["seed"], sampler="ddim", steps=2, guidance=3.0,
                               aug_level=0.5)[0])
    assert np.abs(alone.astype(int) - images[1].astype(int)).max() <= 1  # its own image (see the batched tests)
    assert (out / "tradeoff.png").is_file() and "aug_level=0.5" in (out / "index.html").read_text()

    capsys.readouterr()
    assert main([str(a) for a in argv[:4]] + ["--aug-levels", "2", *map(str, argv[6:])]) == 2
    assert "--aug-levels 2: a level lies in [0, 1]" in capsys.readouterr().err
