"""LPIPS perceptual distance (Zhang et al. 2018) over VGG-16 features, with weights read only from local files.

Two files are needed, both looked up in one folder (the config's `loss.lpips_weights`, else `$LDM_LPIPS_WEIGHTS`):
- the ImageNet VGG-16 of torchvision: `vgg16.safetensors`, `vgg16.pth` or torchvision's own `vgg16-397923af.pth`
  (keys `features.N.weight` / `.bias`; the classifier is ignored);
- the LPIPS linear heads for VGG: `lpips_vgg.safetensors`, `lpips_vgg.pth` or the LPIPS release's `vgg.pth`
  (keys `lin{0..4}.model.1.weight`, or `lin{0..4}.weight`, each `1 c 1 1`).
Nothing is downloaded: without the files LPIPS is off (a warning), or an LdmError when the config requires it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.io.checkpoint import load_into, read_state_dict

ENV = "LDM_LPIPS_WEIGHTS"
VGG_FILES = ("vgg16.safetensors", "vgg16.pth", "vgg16-397923af.pth")
LIN_FILES = ("lpips_vgg.safetensors", "lpips_vgg.pth", "vgg.pth")
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
CHANNELS = (64, 128, 256, 512, 512)
# The LPIPS input normalisation: ImageNet statistics expressed for images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def find_lpips_weights(folder: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """(vgg16 file, linear-heads file) in `folder`, else in $LDM_LPIPS_WEIGHTS; None when no folder is named."""
    given = folder if folder is not None else (os.environ.get(ENV) or None)
    if given is None:
        return None
    root = Path(given).expanduser()
    vgg = next((root / n for n in VGG_FILES if (root / n).is_file()), None)
    lin = next((root / n for n in LIN_FILES if (root / n).is_file()), None)
    if vgg is None or lin is None:
        missing = [f"one of {names}" for names, found in ((VGG_FILES, vgg), (LIN_FILES, lin)) if found is None]
        raise LdmError(f"LPIPS weights folder {root} lacks {' and '.join(missing)} (set by "
                       f"{'loss.lpips_weights' if folder is not None else '$' + ENV})")
    return vgg, lin


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (norm(f_l(x)) - norm(f_l(y))) ||^2, `b 1 1 1`, for images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"])[: TAPS[-1] + 1]  # = torchvision's vgg16().features, without its classifier
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen, whatever the enclosing module does

    def load_weights(self, vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> "LPIPS":
        """Load the VGG-16 feature weights and the five linear heads (safe loads, strict key check)."""
        vgg = read_state_dict(vgg_path)
        vgg = {k.removeprefix("features."): v for k, v in vgg.items() if not k.startswith("classifier.")}
        vgg = {k: v for k, v in vgg.items() if int(k.split(".")[0]) <= TAPS[-1]}
        load_into(self.features, vgg, source=f"LPIPS VGG-16 weights {vgg_path}")
        lin = read_state_dict(lin_path)
        lin = {k.replace(".model.1.", "."): v for k, v in lin.items()}
        lin = {f"{k[3]}.weight": v for k, v in lin.items() if k.startswith("lin") and k.endswith(".weight")}
        load_into(self.lins, lin, source=f"LPIPS linear heads {lin_path}")
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perceptual distance of `b 3 h w` images in [-1, 1], shape `b 1 1 1`."""
        n = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one pass over both images
        total = 0.0
        lins = iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
                diff = (f[:n] - f[n:]).pow(2)
                total = total + next(lins)(diff).mean(dim=(2, 3), keepdim=True)
        return total


def build_lpips(folder: str | os.PathLike | None = None, required: bool = False) -> LPIPS | None:
    """The frozen LPIPS network from local weights; None (with a warning) when absent and not `required`."""
    files = find_lpips_weights(folder)
    if files is None:
        message = (f"LPIPS weights not given (loss.lpips_weights or ${ENV}: a folder holding {VGG_FILES[-1]} and "
                   f"{LIN_FILES[-1]}); training without the perceptual loss")
        if required:
            raise LdmError(message.replace("; training without the perceptual loss",
                                           "; loss.lpips_required=true needs them (or set loss.perceptual_weight=0)"))
        warnings.warn(message, stacklevel=2)
        return None
    return LPIPS().load_weights(*files)
