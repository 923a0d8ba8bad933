"""Evaluation during training: generate images for fixed prompts, score them, and return a grid for the logger."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from PIL import Image

from ldm.errors import LdmError
from ldm.eval.clip_score import ClipModel, clip_score
from ldm.eval.features import FeatureExtractor, compute_features
from ldm.eval.frechet import GaussianStats, fid
from ldm.eval.grid import make_grid
from ldm.eval.inception import stats_space


def evaluate_generations(
    generate: Callable[[list[str]], list[Image.Image]],  # prompts -> one image per prompt
    prompts: list[str],
    clip: ClipModel,  # loaded once by the caller and reused at every evaluation
    *,
    ref_stats: GaussianStats | None = None,  # reference statistics; their extractor decides between FID and FD_CLIP
    fid_extractor: FeatureExtractor | None = None,  # an InceptionExtractor when ref_stats are Inception statistics
    ncols: int = 4,
    batch_size: int = 16,
) -> tuple[dict, Image.Image]:
    """Return ({"clip_score", ["fid" | "fd_clip"]}, captioned grid) for the images `generate(prompts)` makes.

    With a few hundred images FID is biased upward (and rank-deficient below 2048 images): compare values between
    checkpoints of one run measured with the same prompts, not with published numbers.
    """
    images = generate(list(prompts))
    if len(images) != len(prompts):
        raise LdmError(f"the generate callable returned {len(images)} images for {len(prompts)} prompts")
    img = compute_features(images, clip, batch_size=batch_size, keep=True, progress=False, desc="eval CLIP")
    scores = clip_score(img.values, clip.encode_texts(list(prompts)))  # b
    metrics = {"clip_score": float(scores.mean())}
    if ref_stats is not None:
        if ref_stats.extractor == clip.name:
            metrics["fd_clip"] = fid(img.moments.to_stats(clip.name), ref_stats)
        elif fid_extractor is not None:
            # A file without a feature-space name (pytorch-fid's) holds default-resizer Inception statistics.
            ref = replace(ref_stats, extractor=stats_space(ref_stats))
            feats = compute_features(images, fid_extractor, batch_size=batch_size, keep=False, progress=False)
            metrics["fid"] = fid(feats.moments.to_stats(fid_extractor.name), ref)
        else:
            raise LdmError(
                f"reference statistics of {ref_stats.extractor or 'Inception (pytorch-fid file)'!r} "
                "need fid_extractor, "
                f"or statistics made with {clip.name!r} for FD_CLIP"
            )
    captions = [f"{p} ({s:.1f})" for p, s in zip(prompts, scores.tolist())]
    return metrics, make_grid(images, ncols, captions)
