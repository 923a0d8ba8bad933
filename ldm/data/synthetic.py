"""Synthetic captioned shapes ("a red circle on the left"): a dataset that is deterministic by seed, for tests and demos."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from ldm.data.shards import AtomicShardWriter, encode_image, make_record

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
# centre of the shape as a fraction of (width, height), and the caption's phrase
POSITIONS = {
    "left": ((0.25, 0.5), "on the left"),
    "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "centre": ((0.5, 0.5), "in the centre"),
}


@dataclass
class ShapeSample:
    """One synthetic image with its caption and the factors that made it."""

    key: str
    image: Image.Image
    caption: str
    shape: str
    colour: str
    position: str


def shape_caption(shape: str, colour: str, position: str) -> str:
    """'a red circle on the left', 'an orange star at the top'."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} {POSITIONS[position][1]}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        return [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
             cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw_shape(shape: str, colour: str, position: str, image_size: int = 64, rng: random.Random | None = None,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Draw one filled shape of radius ~0.15-0.2 of the image at its position (with a little jitter)."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (image_size, image_size), background)
    (fx, fy), _ = POSITIONS[position]
    radius = image_size * rng.uniform(0.15, 0.2)
    cx = image_size * fx + rng.uniform(-0.04, 0.04) * image_size
    cy = image_size * fy + rng.uniform(-0.04, 0.04) * image_size
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=fill)
    return image


def generate_shapes(n: int, seed: int = 0, image_size: int = 64, key_prefix: str = "") -> Iterator[ShapeSample]:
    """n samples; sample i depends only on (seed, i), so a longer run starts with the same samples."""
    if not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be between 8 and 1024 px, got {image_size}")
    for i in range(n):
        rng = random.Random(f"shapes/{seed}/{i}")
        shape, colour, position = rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(POSITIONS))
        image = draw_shape(shape, colour, position, image_size, rng)
        yield ShapeSample(f"{key_prefix}{i:09d}", image, shape_caption(shape, colour, position), shape, colour, position)


def write_shape_shards(out_dir: str | os.PathLike, n: int, seed: int = 0, image_size: int = 64, samples_per_shard: int = 100,
                       image_format: str = "jpg", progress: bool = False) -> list[Path]:
    """Write n shape samples as img2dataset-layout shards in out_dir; returns the shard paths."""
    samples = generate_shapes(n, seed, image_size)
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, total=n, desc="shapes", unit="img")
    with AtomicShardWriter(out_dir, samples_per_shard) as writer:
        for s in samples:
            meta = {"width": image_size, "height": image_size, "original_width": image_size, "original_height": image_size,
                    "shape": s.shape, "colour": s.colour, "position": s.position, "source": "synthetic-shapes",
                    "license": "CC0-1.0 (generated)", "seed": seed}
            writer.write(make_record(s.key, encode_image(s.image, image_format), image_format, s.caption, meta))
    return writer.shards
