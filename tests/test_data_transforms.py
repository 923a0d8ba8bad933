"""Filters, caption dropout, image transforms and bucketing, each against a hand-computed answer."""
import random

import pytest
import torch
from PIL import Image

from ldm.data.buckets import bucket_batches, make_buckets, nearest_bucket
from ldm.data.captions import drop_captions
from ldm.data.filters import SampleFilter, original_size
from ldm.data.transforms import CorruptImage, decode_image, image_transform, to_pil, to_rgb, to_tensor
from ldm.data.shards import encode_image


def test_filters_drop_what_they_should():
    meta = {"width": 512, "height": 512, "original_width": 300, "original_height": 900,
            "similarity": 0.31, "pwatermark": 0.2, "punsafe": 0.05, "aesthetic": 5.5}
    assert original_size(meta) == (300, 900)  # original_* wins over the resized width/height
    assert SampleFilter()(meta)
    assert SampleFilter(min_size=301).reject_reason(meta) == "min_size"
    assert SampleFilter(min_size=300)(meta)
    assert SampleFilter(max_aspect_ratio=2.9).reject_reason(meta) == "aspect_ratio"
    assert SampleFilter(max_aspect_ratio=3.0)(meta)
    assert SampleFilter(min_similarity=0.32).reject_reason(meta) == "similarity"
    assert SampleFilter(max_watermark=0.1).reject_reason(meta) == "watermark"
    assert SampleFilter(max_punsafe=0.01).reject_reason(meta) == "punsafe"
    assert SampleFilter(min_aesthetic=6.0).reject_reason(meta) == "aesthetic"
    assert SampleFilter(min_similarity=0.3, max_watermark=0.5, max_punsafe=0.1, min_aesthetic=5.0)(meta)
    # absent scores pass; absent sizes fall back to the decoded image size
    assert SampleFilter(min_similarity=0.9, max_punsafe=0.0)({"caption": "x"})
    rule = SampleFilter(min_size=64)
    assert rule.needs_image_size({}) and not rule.needs_image_size(meta)
    assert rule.reject_reason({}, image_size=(100, 50)) == "min_size" and rule({}, image_size=(100, 64))


def test_caption_dropout_rate_and_determinism():
    captions = [f"c{i}" for i in range(20000)]
    out, mask = drop_captions(captions, 0.3, torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.3) < 0.015  # 5 sigma of a binomial(20000, 0.3) rate is 0.016
    assert all((o == "") == m for o, m in zip(out, mask.tolist()))
    assert all(o == c for o, c, m in zip(out, captions, mask.tolist()) if not m)
    again, mask2 = drop_captions(captions, 0.3, torch.Generator().manual_seed(0))
    assert again == out and torch.equal(mask, mask2)
    assert drop_captions(captions[:5], 0.0)[0] == captions[:5]
    assert drop_captions(captions[:5], 1.0)[0] == [""] * 5


def test_transform_resizes_the_shorter_side_and_crops_the_centre():
    # 128x64 (w x h): left quarter red, middle half green, right quarter blue
    image = Image.new("RGB", (128, 64), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    image.paste((0, 0, 255), (96, 0, 128, 64))
    x = image_transform(image, (32, 32), "center")
    assert x.shape == (3, 32, 32)
    # shorter side 64 -> 32 gives 64x32; the centre crop keeps only the green middle half
    assert torch.allclose(x[:, 2:-2, 2:-2].mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    flipped = image_transform(image, (32, 64), "center", flip_prob=1.0)
    assert flipped[0, 16, 2] < -0.9 and flipped[2, 16, 2] > 0.9  # blue now on the left
    crops = {tuple(image_transform(image, (32, 32), "random", rng=random.Random(s))[:, 16, 0].tolist()) for s in range(20)}
    assert len(crops) > 1  # random crops land on different colours


def test_tensor_range_rgba_background_and_corrupt_bytes():
    image = Image.new("RGB", (4, 4), (0, 128, 255))
    x = to_tensor(image)
    assert x[0].max() == -1.0 and x[2].min() == 1.0 and abs(x[1, 0, 0].item() - (128 / 127.5 - 1)) < 1e-6
    assert to_pil(x).tobytes() == image.tobytes()
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(transparent, (1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)
    jpeg = encode_image(Image.new("RGB", (64, 64), (9, 9, 9)), "jpg")
    assert decode_image(jpeg).size == (64, 64)
    for bad in (jpeg[: len(jpeg) // 2], b"\x00garbage" * 50):
        with pytest.raises(CorruptImage):
            decode_image(bad)


def test_sixteen_bit_grey_training_images_are_rescaled_not_clipped_white():
    import io

    import numpy as np

    grey = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 in 16-bit steps
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")  # reopened as I;16: convert("RGB") put 99.6% of it at 255
    pixels = np.asarray(decode_image(buffer.getvalue()))
    assert pixels.shape == (16, 16, 3) and np.array_equal(pixels[..., 0], np.arange(256).reshape(16, 16))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    buffer = io.BytesIO()
    Image.new("F", (8, 8), 0.5).save(buffer, format="TIFF")  # floating point of no known range: a skipped sample
    with pytest.raises(CorruptImage, match="no known value range"):
        decode_image(buffer.getvalue())


def test_buckets_pick_the_nearest_aspect_ratio_and_batch_by_bucket():
    buckets = [(64, 64), (48, 80), (80, 48)]  # (h, w)
    assert nearest_bucket(100, 100, buckets) == 0
    assert nearest_bucket(170, 100, buckets) == 1  # w/h 1.7 is nearest 80/48 = 1.67
    assert nearest_bucket(100, 170, buckets) == 2
    assert nearest_bucket(120, 100, buckets) == 0  # 1.2 is nearer 1.0 than 1.67 in log ratio
    pairs = [(i % 3, i) for i in range(10)]
    batches = list(bucket_batches(pairs, 2, list, partial=True))
    assert batches[:3] == [[0, 3], [1, 4], [2, 5]]
    assert sorted(x for b in batches for x in b) == list(range(10))
    assert len(list(bucket_batches(pairs, 2, list, partial=False))) == 4  # 9 of 10 in full batches: 4, 3 left over
    made = make_buckets(256, step=64)
    assert (256, 256) in made and all(h % 64 == 0 and w % 64 == 0 for h, w in made)
    assert all(0.7 < h * w / 256**2 <= 1.0 for h, w in made)
