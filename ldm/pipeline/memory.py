"""How much memory one generation needs, and how much there is: refuse a size that cannot fit before allocating it.

The estimate counts the activations that are alive at the peak of a U-Net step and of the autoencoder decode
(the weights are already loaded when it is made). It is meant to be within a small factor of the truth: enough
to refuse 100000 x 100000 at once instead of being killed by the kernel's OOM killer minutes later.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.errors import LdmError

_SCORES_BYTES = 4  # the math backend materialises float32 attention scores (and their softmax: x2)


def _blocks(unet_config, level: int) -> int:
    """ResBlocks at a level: one count (SD U-Net) or one per level (Efficient U-Net)."""
    per_level = getattr(unet_config, "blocks_per_level", None)
    return per_level[level] if per_level is not None else unet_config.num_res_blocks


def _attends(unet_config, level: int) -> bool:
    """Whether a level has attention: SD's `attention_resolutions` (downsampling rates) or Efficient U-Net's levels."""
    if hasattr(unet_config, "attention_resolutions"):
        return 2**level in unet_config.attention_resolutions
    return level in (*unet_config.attention_levels, *getattr(unet_config, "cross_attention_levels", ()))


def _level_channels(unet_config) -> list[int]:
    """Channels per level: `block_channels` (IF's U-Net) or model_channels times channel_mult."""
    own = getattr(unet_config, "block_channels", None)
    return list(own) if own is not None else [unet_config.model_channels * m for m in unet_config.channel_mult]


def estimate_generation_bytes(
    unet_config,
    autoencoder_config,  # None for a pixel-space model (no decoder runs)
    *,
    height: int,
    width: int,
    n: int,  # images per call
    guidance: bool,  # classifier-free guidance doubles the U-Net batch
    dtype: torch.dtype,
    attention_backend: str = "sdpa",
    device_type: str = "cpu",
) -> int:
    """Peak activation bytes of sampling `n` images of `height` x `width` pixels and decoding them.

    Measured on the CPU against the growth of peak RSS (SD-1 and the bundled model's shapes, 256-512 px, batch
    1-2, sdpa and math attention) it gave 0.6-1.0x of the truth: low enough never to refuse a size that fits.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    # The autoencoder's downsampling factor; a pixel-space model samples at full resolution.
    f = 1 if autoencoder_config is None else 2 ** (len(autoencoder_config.ch_mult) - 1)
    batch = n * (2 if guidance else 1)
    math_scores = attention_backend == "math"  # sdpa / xformers never hold the n x n score matrix

    # U-Net: every level's skip activations stay alive until the up path uses them; the peak adds one level's
    # working set (ResBlock: input, normalised, activated, conv outputs, concatenated skip; transformer: norms,
    # q, k, v, attention output, the GEGLU's 8c projection, its gate and product).
    skips, work = 0, 0
    heads = getattr(unet_config, "num_heads", -1)
    for level, channels in enumerate(_level_channels(unet_config)):
        tokens = (height // f // 2**level) * (width // f // 2**level)
        act = batch * channels * tokens * elem
        skips += (_blocks(unet_config, level) + 1) * act
        level_work = 8 * act
        if _attends(unet_config, level):
            level_work += 20 * act
            if math_scores:
                head_dim = getattr(unet_config, "num_head_channels", None) or unet_config.attention_head_dim
                h = heads if heads > 0 else channels // head_dim
                level_work += 2 * batch * h * tokens * tokens * _SCORES_BYTES
        work = max(work, level_work)
    unet_peak = skips + work

    # Decoder: each level runs at its resolution with ch * ch_mult[level] channels; upsampling first brings the
    # coarser level's wider channels up to it. Four tensors of that size are alive inside a ResnetBlock.
    mults = autoencoder_config.ch_mult if autoencoder_config is not None else []
    decode_peak = 0
    for level, mult in enumerate(mults):
        channels = autoencoder_config.ch * max(mult, mults[min(level + 1, len(mults) - 1)])
        pixels = (height // 2**level) * (width // 2**level)
        decode_peak = max(decode_peak, 4 * n * channels * pixels * elem)
    # The mid-block's single-head attention over the latent pixels: on the CPU PyTorch's SDPA materialises its
    # float32 scores for it as the math backend does (measured), on CUDA the fused kernels do not.
    if autoencoder_config is not None and (math_scores or device_type != "cuda"):
        tokens = (height // f) * (width // f)
        decode_peak = max(decode_peak, 2 * n * tokens * tokens * _SCORES_BYTES)
    decode_peak += n * 3 * height * width * (4 + 4 + 1)  # float32 image, its [0, 1] copy, the uint8 array

    channels = unet_config.out_channels
    latents = 4 * batch * channels * (height // f) * (width // f) * elem  # x, noise, x0, d
    return max(unet_peak, decode_peak) + latents


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when a limit is set."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on `device`: CUDA's free bytes, else MemAvailable (and the cgroup limit); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    cgroup = _cgroup_available()
    return available if cgroup is None else min(available, cgroup)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(needed: int, available: int | None, *, height: int, width: int, n: int, device) -> None:
    """LdmError when a generation of `needed` bytes cannot fit in `available`."""
    if available is not None and needed > available:
        raise LdmError(
            f"generating {n} image(s) of {width}x{height} needs about {_gib(needed)} of {torch.device(device).type} "
            f"memory, but only {_gib(available)} is available; lower --height/--width or --n"
        )
