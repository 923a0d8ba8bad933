"""tools/eval_sr.py's maths: PSNR with a known answer and the 64 px tiles the CLIP sees."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

spec = importlib.util.spec_from_file_location("eval_sr", Path(__file__).resolve().parents[1] / "tools" / "eval_sr.py")
eval_sr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_sr)


def test_psnr_of_a_known_error():
    a = np.full((8, 8, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[:4] += 10  # half the pixels off by 10: MSE 50
    assert eval_sr.psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(10 * np.log10(255 ** 2 / 50))
    assert eval_sr.psnr(Image.fromarray(a), Image.fromarray(a)) == float("inf")


def test_tiles_cover_a_256px_image_in_16_tiles_row_by_row():
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    image[64:128, 192:256] = 255  # the tile in row 1, column 3
    tiles = eval_sr.tiles(Image.fromarray(image))
    assert len(tiles) == 16 and all(t.size == (64, 64) for t in tiles)
    assert [int(np.asarray(t).max()) for t in tiles].index(255) == 1 * 4 + 3
