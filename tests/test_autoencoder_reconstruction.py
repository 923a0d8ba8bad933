"""tools/eval_default_model.py reconstruct: the bundled autoencoder's round trip, its PSNR, and a folder ldm-eval reads."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import LdmError
from ldm.eval.imagefolder import read_metadata
from ldm.pipeline.images import from_pil, to_pil
from ldm.pipeline.load import load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
try:
    import eval_default_model as evaluate
finally:
    sys.path.pop(0)


def emoji_like(seed: int) -> Image.Image:
    """A flat disc on white, the kind of image the autoencoder was trained on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    cy, cx, r = rng.integers(20, 44, size=2).tolist() + [int(rng.integers(10, 18))]
    img = np.full((64, 64, 3), 255, np.uint8)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, size=3)
    return Image.fromarray(img)


def test_reconstruct_writes_the_round_trip_and_its_psnr(tmp_path, capsys):
    src = tmp_path / "real"
    src.mkdir()
    for i in range(3):
        emoji_like(i).save(src / f"{i:03d}.png")
    (src / "metadata.jsonl").write_text(json.dumps({"file_name": "001.png", "text": "a disc"}) + "\n")
    assert evaluate.main(["reconstruct", "--images", str(src), "--out", str(tmp_path / "ae"), "--batch-size", "2",
                          "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    codec = load_pipeline(device="cpu").codec
    with torch.no_grad():  # the same round trip by hand
        expected = to_pil(codec.decode(codec.encode(from_pil([emoji_like(i) for i in range(3)]))))
    psnrs = []
    for i, want in enumerate(expected):
        got = Image.open(tmp_path / "ae" / f"{i:03d}.png")
        assert np.array_equal(np.asarray(got), np.asarray(want))
        mse = np.mean((np.asarray(emoji_like(i), dtype=float) - np.asarray(want, dtype=float)) ** 2)
        psnrs.append(10 * np.log10(255 ** 2 / mse))
    assert report["images"] == 3 and report["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-9)
    assert report["psnr"] > 20  # a working autoencoder on its own kind of image (a broken one gives ~5-10 dB)
    rows = read_metadata(tmp_path / "ae")  # ldm-eval --images reads it
    assert [r.text for r in rows] == ["", "a disc", ""]


def test_reconstruct_refuses_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LdmError, match="no images"):
        evaluate.reconstruct(type("A", (), {"images": str(tmp_path / "empty"), "out": str(tmp_path / "o"),
                                             "model": None, "device": "cpu", "batch_size": 4})())
    assert not (tmp_path / "o").exists()
