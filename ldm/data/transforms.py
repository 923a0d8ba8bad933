"""Image transforms for training: decode, resize the shorter side, centre/random crop, flip, to a tensor in [-1, 1]."""
from __future__ import annotations

import io
import random
import warnings

import numpy as np
import torch
from PIL import Image

from ldm.errors import LdmError
from ldm.imagemodes import SIXTEEN_BIT_MODES, to_rgb8

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CorruptImage(Exception):
    """The bytes are not a decodable image (truncated, garbage, decompression bomb)."""


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert to RGB, compositing any transparency over `background` (not the black that convert("RGB") gives).

    16-bit grey (a PNG of mode I;16 or I) is rescaled by `ldm.imagemodes.to_rgb8`: Pillow's convert("RGB") clips it at
    255, a white image. 32-bit images of no known range (TIFF modes I, F) raise CorruptImage (a skipped sample)."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        try:
            return to_rgb8(image)
        except LdmError as e:
            raise CorruptImage(str(e)) from e
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, background + (255,))
        canvas.alpha_composite(image)
        return canvas.convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode image bytes to an RGB PIL image, raising CorruptImage for anything PIL cannot fully read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # a truncated file fails here, not at open()
        return to_rgb(image, background)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptImage(f"{type(e).__name__}: {e}") from e


def resize_to_cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (bicubic, keeping the aspect ratio) so that the image covers a height x width box."""
    w, h = image.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)


def crop(image: Image.Image, height: int, width: int, mode: str = "center", rng: random.Random | None = None) -> Image.Image:
    """Crop a height x width window, centred or at a uniformly random offset."""
    return crop_with_offset(image, height, width, mode, rng)[0]


def crop_with_offset(image: Image.Image, height: int, width: int, mode: str = "center",
                     rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`crop`, and the window's (top, left) corner (SDXL conditions on it)."""
    w, h = image.size
    if mode == "center":
        left, top = (w - width) // 2, (h - height) // 2
    elif mode == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, w - width), rng.randint(0, h - height)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {mode!r}")
    return image.crop((left, top, left + width, top + height)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor `c h w` in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor `c h w` in [-1, 1] -> RGB PIL image (inverse of to_tensor up to rounding; NaN -> black).

    Rounded as diffusers' image processor rounds: round(clamp(x / 2 + 0.5, 0, 1) * 255).
    """
    x = (tensor.detach().float().nan_to_num(-1.0) / 2 + 0.5).clamp(0, 1)
    return Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def image_transform(
    image: Image.Image,
    size: tuple[int, int],
    crop_mode: str = "center",
    flip_prob: float = 0.0,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize the shorter side, crop to size = (h, w), flip horizontally with flip_prob; returns `c h w` in [-1, 1]."""
    return image_transform_with_crop(image, size, crop_mode, flip_prob, rng)[0]


def image_transform_with_crop(image: Image.Image, size: tuple[int, int], crop_mode: str = "center",
                              flip_prob: float = 0.0,
                              rng: random.Random | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """`image_transform`, and the crop's (top, left) in the resized image (SDXL's crop conditioning)."""
    rng = rng or random.Random()
    height, width = size
    image, corner = crop_with_offset(resize_to_cover(image, height, width), height, width, crop_mode, rng)
    if flip_prob > 0 and rng.random() < flip_prob:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image), corner
