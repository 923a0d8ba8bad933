"""Any decoded image to 8-bit RGB without silent clipping: Pillow's convert("RGB") saturates 16-bit grey at 255."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ldm.errors import LdmError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(image: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB (alpha dropped, as pytorch-fid does); 16-bit grey is rescaled, modes of unknown range are refused."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format in ("PNG", "PPM")):
        # 16-bit PNG grey (Pillow opens it as I;16 or I) and PGM grey over 8 bits (Pillow scales it to 0..65535 in
        # mode I): 0..65535 -> 0..255, as 16-bit RGB PNGs are reduced.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "32-bit floating-point"
        raise LdmError(f"{name}: {kind} image (mode {mode}) has no known value range; "
                       "convert it to an 8-bit or 16-bit RGB PNG first")
    return image.convert("RGB")
