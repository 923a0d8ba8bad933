"""TF-compatible InceptionV3 pool features (2048-d) through torch-fidelity, with offline-friendly weight lookup."""

from __future__ import annotations

import os
import socket
import urllib.error
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.errors import CheckpointError, LdmError

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
WEIGHTS_ENV = "LDM_INCEPTION_WEIGHTS"
EXTRACTOR_NAME = "inception-v3-tf-2015-12-05"  # stored in .npz files we write, so unlike feature spaces never meet
# How an image reaches 299x299. tf-bilinear: the network's own TF1-exact bilinear resize (torch-fidelity, pytorch-fid,
# the FID of most papers). pil-bicubic: PIL's antialiased bicubic first (clean-fid's filter; rounded to 8 bits here,
# as the network takes uint8), then the network's resize is the identity.
RESIZERS = ("tf-bilinear", "pil-bicubic")
INPUT_SIZE = 299
FEATURE_DIM = 2048  # pool3 features


def extractor_name(resizer: str = RESIZERS[0]) -> str:
    """The feature space of Inception features made with `resizer`, as statistics files name it."""
    return EXTRACTOR_NAME if resizer == RESIZERS[0] else f"{EXTRACTOR_NAME}+{resizer}"


def stats_space(stats) -> str:
    """The feature space of Inception statistics: a file without a name (pytorch-fid's, clean-fid's, the original
    TensorFlow code's) holds TF-Inception statistics made with the default resizer."""
    return stats.extractor or EXTRACTOR_NAME


class MissingWeightsError(LdmError):
    """The Inception weights are not on this machine and cannot be downloaded."""


def _offline() -> bool:
    flags = ("LDM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HUB_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _missing_message(reason: str) -> str:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    return (
        f"Inception weights for FID are not available ({reason}). Download {WEIGHTS_URL} on a machine with "
        f"internet access, then pass --inception-weights FILE, set ${WEIGHTS_ENV}=FILE, or copy it to {cached}"
    )


def resolve_inception_weights(path: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The weights file: `path`, else $LDM_INCEPTION_WEIGHTS, else torch hub's cache, else a download (when online)."""
    for given, origin in ((path, "--inception-weights"), (os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}")):
        if given is not None:
            if not Path(given).is_file():
                raise MissingWeightsError(_missing_message(f"{origin} points to {given}, which does not exist"))
            return Path(given)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    if cached.is_file():
        return cached
    if not download or _offline():
        raise MissingWeightsError(_missing_message("offline mode is set" if download else "downloads disabled"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # per socket operation: a dead network fails within seconds instead of hanging
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=True)
    except (urllib.error.URLError, OSError, socket.timeout) as e:
        raise MissingWeightsError(_missing_message(f"download failed: {e}")) from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return cached


class InceptionExtractor:
    """2048-d pool3 features of the TF FID Inception (torch-fidelity's port: TF1-exact bilinear resize to 299)."""

    name = EXTRACTOR_NAME  # with the default resizer
    dim = FEATURE_DIM

    def __init__(self, weights: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 resizer: str = RESIZERS[0]):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if resizer not in RESIZERS:
            raise LdmError(f"unknown resizer {resizer!r}; choose one of {', '.join(RESIZERS)}")
        self.resizer = resizer
        # Another resizer gives other statistics: its name goes into the feature space's name (and .npz files).
        self.name = extractor_name(resizer)

        self.weights = resolve_inception_weights(weights)
        # torch-fidelity reads the file with weights_only=False; refuse anything a safe load would not accept.
        try:
            torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors come in many types
            raise CheckpointError(f"{self.weights}: not a plain tensor state dict, refusing to load it ({e})") from e
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(self.weights)
            )
        except RuntimeError as e:
            raise CheckpointError(f"{self.weights}: does not fit torch-fidelity's InceptionV3 ({str(e)[:500]})") from e
        self.device = torch.device(device)
        self.net = net.to(self.device)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> uint8 `3 h w` (the network resizes to 299 and normalises itself)."""
        if self.resizer == "pil-bicubic" and image.size != (INPUT_SIZE, INPUT_SIZE):
            image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BICUBIC)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 `b 3 h w` -> `b 2048`."""
        return self.net(batch)[0]
