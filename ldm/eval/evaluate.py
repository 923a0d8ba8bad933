"""Score a captioned image folder: CLIP score per image, and FID or FD_CLIP (optionally KID) to a reference."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.errors import LdmError
from ldm.eval.clip_score import ClipModel, clip_score
from ldm.eval.features import FeatureExtractor, compute_features
from ldm.eval.frechet import GaussianStats, fid, load_stats
from ldm.eval.imagefolder import list_images, read_metadata
from ldm.eval.inception import stats_space
from ldm.eval.kid import kid
from ldm.eval.precision_recall import PR_K, precision_recall


def check_set_size(n_images: int, what: str, *, distance: bool, precision_recall: bool = False) -> None:
    """Refuse, before any network loads, an image set too small for the metrics asked of it."""
    if distance and n_images < 2:
        raise LdmError(f"{what}: {n_images} image(s); a Frechet distance (FID, FD_CLIP) and KID need at least 2 per "
                       "set (they compare covariances); add images, or leave out --ref")
    if precision_recall and n_images <= PR_K:
        raise LdmError(f"{what}: {n_images} image(s); precision and recall (k={PR_K}) need at least {PR_K + 1} per set "
                       f"(each image's ball reaches its {PR_K}rd nearest neighbour in its set); add images, or leave "
                       "out --precision-recall")


class Reference:
    """Reference images (a folder) or statistics (.npz), with features computed once per extractor and cached."""

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 50, num_workers: int = 0, recursive: bool = False,
                 accelerator=None, keep_features: bool = False):
        self.path = Path(path)
        self.batch_size, self.num_workers, self.accelerator = batch_size, num_workers, accelerator
        self.keep_features = keep_features  # KID / precision-recall will ask: keep them from the first pass
        self.npz = load_stats(self.path) if self.path.suffix == ".npz" else None
        self.images = None if self.npz is not None else list_images(self.path, recursive)
        self._cache: dict[str, tuple[GaussianStats, torch.Tensor | None]] = {}

    def _compute(self, extractor: FeatureExtractor, keep: bool) -> tuple[GaussianStats, torch.Tensor | None]:
        cached = self._cache.get(extractor.name)
        keep = keep or self.keep_features
        if cached is None or (keep and cached[1] is None):
            feats = compute_features(
                self.images,
                extractor,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                keep=keep,
                accelerator=self.accelerator,
                desc=f"reference {extractor.name}",
            )
            cached = self._cache[extractor.name] = (feats.moments.to_stats(extractor.name), feats.values)
        return cached

    def stats(self, extractor: FeatureExtractor) -> GaussianStats:
        """Reference statistics in the feature space of `extractor`."""
        if self.npz is None:
            return self._compute(extractor, keep=False)[0]
        space = stats_space(self.npz)  # pytorch-fid files carry no extractor name: they hold Inception statistics
        if space != extractor.name or self.npz.dim != extractor.dim:
            raise LdmError(
                f"{self.path}: holds {self.npz.dim}-d statistics of {space!r}, "
                f"but {extractor.name!r} ({extractor.dim}-d) "
                "is being measured; pass a folder of reference images, or an .npz made with the same extractor"
            )
        return self.npz

    def features(self, extractor: FeatureExtractor) -> torch.Tensor:
        """Per-image reference features (folders only: KID and precision / recall need them)."""
        if self.npz is not None:
            raise LdmError(f"{self.path}: KID and precision / recall need reference images, not an .npz of statistics")
        return self._compute(extractor, keep=True)[1]


def score_folder(
    folder: str | os.PathLike,
    clip: ClipModel,
    *,
    ref: Reference | None = None,
    distance: FeatureExtractor
    | None = None,  # the extractor of the distance to `ref`: Inception (FID) or `clip` (FD_CLIP)
    with_kid: bool = False,
    with_precision_recall: bool = False,  # Kynkaanniemi et al. 2019, k = PR_K, in the distance's feature space
    batch_size: int = 50,
    num_workers: int = 0,
    accelerator=None,  # several processes: each takes a share of the images; features and moments are gathered
) -> dict:
    """Metrics of a folder with metadata.jsonl: {clip_score, fid | fd_clip, [kid], [precision, recall], n_images,
    per_image}."""
    rows = read_metadata(folder)
    img = compute_features(
        [r.path for r in rows],
        clip,
        batch_size=batch_size,
        num_workers=num_workers,
        keep=True,
        accelerator=accelerator,
        desc=f"CLIP {Path(folder).name}",
    )
    texts = [r.text for r in rows]
    txt = clip.encode_texts(texts)
    scores = clip_score(img.values, txt)  # b
    # prompts over the CLIP text context (77 tokens for OpenAI's CLIP) are scored on their first tokens only
    truncated = clip.truncated_prompts(texts)
    result: dict = {"n_images": len(rows), "clip_score": float(scores.mean()), "truncated_prompts": len(truncated)}
    if ref is not None and distance is not None:
        key = "fd_clip" if distance is clip else "fid"
        feats = (
            img
            if distance is clip
            else compute_features(
                [r.path for r in rows],
                distance,
                batch_size=batch_size,
                num_workers=num_workers,
                keep=with_kid or with_precision_recall,
                accelerator=accelerator,
                desc=f"Inception {Path(folder).name}",
            )
        )
        result[key] = fid(feats.moments.to_stats(distance.name), ref.stats(distance))
        if with_kid:
            mean, std = kid(feats.values, ref.features(distance), subset_size=1000)
            result["kid" if key == "fid" else "kid_clip"] = {"mean": mean, "std": std}
        if with_precision_recall:
            precision, recall = precision_recall(ref.features(distance), feats.values, k=PR_K)
            result["precision_recall"] = {"precision": precision, "recall": recall, "k": PR_K,
                                          "features": distance.name}
    cut = set(truncated)
    result["per_image"] = [
        {
            "file_name": r.file_name,
            "text": r.text,
            "clip_score": float(s),
            **({"category": r.category} if r.category else {}),
            **({"truncated": True} if i in cut else {}),
        }
        for i, (r, s) in enumerate(zip(rows, scores))
    ]
    return result
