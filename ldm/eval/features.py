"""Batched feature extraction over image files or PIL images, one process or several (accelerate)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.errors import LdmError
from ldm.eval.frechet import FeatureMoments
from ldm.eval.imagefolder import load_rgb
from ldm.imagemodes import to_rgb8

ImageSource = Union[str, os.PathLike, Image.Image]


class FeatureExtractor(Protocol):
    """What `compute_features` drives: per-image CPU preparation, then a batched network call."""

    name: str  # the feature space, stored with statistics so that unlike spaces are never compared
    dim: int
    device: torch.device

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> network input `c h w` on the CPU (runs in DataLoader workers)."""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """`b c h w` -> features `b d`."""


@dataclass
class Features:
    """Feature moments over all images and, when kept, the features themselves in input order (`n d`, float64)."""

    moments: FeatureMoments
    values: torch.Tensor | None


class _PreparedImages(torch.utils.data.Dataset):
    """Decodes and prepares the images at `indices`; a bad file yields its error instead of killing a worker."""

    def __init__(self, items: Sequence[ImageSource], prepare, indices: Sequence[int]):
        self.items, self.prepare, self.indices = items, prepare, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        item = self.items[index]
        try:
            image = to_rgb8(item) if isinstance(item, Image.Image) else load_rgb(item)
        except LdmError as e:
            return index, None, str(e)
        return index, self.prepare(image), None


def _same_shape_runs(samples: list) -> list[tuple[list[int], torch.Tensor]]:
    """Split a batch into runs of equally sized images and stack each run (FID images need not share a size)."""
    runs: list[tuple[list[int], list[torch.Tensor]]] = []
    for index, x, _ in samples:
        if runs and runs[-1][1][0].shape == x.shape:
            runs[-1][0].append(index)
            runs[-1][1].append(x)
        else:
            runs.append(([index], [x]))
    return [(idx, torch.stack(xs)) for idx, xs in runs]


def compute_features(
    images: Sequence[ImageSource],
    extractor: FeatureExtractor,
    *,
    batch_size: int = 50,
    num_workers: int = 0,  # DataLoader workers decoding images
    keep: bool = True,  # also return the per-image features (needed for CLIP score and KID; FID needs only moments)
    accelerator=None,  # an accelerate.Accelerator: each process takes every world_size-th image
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """Extract features of every image; moments (and kept features) are gathered over all processes."""
    if len(images) == 0:
        raise LdmError("no images to extract features from")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    dataset = _PreparedImages(images, extractor.prepare, range(rank, len(images), world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    moments = FeatureMoments(extractor.dim, device=extractor.device)
    kept_index, kept_values = [], []
    with (
        torch.inference_mode(),
        tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress or rank != 0) as bar,
    ):
        for samples in loader:
            for _, _, error in samples:
                if error is not None:
                    raise LdmError(error)
            for index, batch in _same_shape_runs(samples):
                feats = extractor(batch.to(extractor.device)).to(torch.float64)  # b d
                moments.add(feats)
                if keep:
                    kept_index.append(torch.tensor(index, device=feats.device))
                    kept_values.append(feats)
            bar.update(len(samples))
    moments.reduce(accelerator)
    values = None
    if keep:
        index = torch.cat(kept_index) if kept_index else torch.zeros(0, dtype=torch.long, device=extractor.device)
        values = (
            torch.cat(kept_values)
            if kept_values
            else torch.zeros(0, extractor.dim, dtype=torch.float64, device=extractor.device)
        )
        if world > 1:
            index = accelerator.gather(accelerator.pad_across_processes(index, dim=0, pad_index=-1))
            values = accelerator.gather(accelerator.pad_across_processes(values, dim=0))
            real = index >= 0
            index, values = index[real], values[real]
        values = values[torch.argsort(index)].cpu()
    return Features(moments=moments, values=values)
