"""Aspect-ratio bucketing (NovelAI 2022, SDXL sec. 2.3): each batch holds images of one (h, w) bucket."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Sequence


def make_buckets(resolution: int, min_side: int | None = None, max_side: int | None = None, step: int = 64) -> list[tuple[int, int]]:
    """(h, w) buckets of about resolution**2 pixels, sides multiples of `step` between min_side and max_side."""
    min_side = min_side or resolution // 2
    max_side = max_side or resolution * 2
    area = resolution * resolution
    buckets = set()
    for width in range(min_side - min_side % step or step, max_side + 1, step):
        height = (area // width) // step * step
        if min_side <= height <= max_side and width >= min_side:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the (h, w) bucket whose aspect ratio is nearest to the image's, measured in log(w / h)."""
    log_ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(log_ratio - math.log(buckets[i][1] / buckets[i][0])), i))


def bucket_batches(
    samples: Iterable[tuple[int, Any]],
    batch_size: int,
    collate: Callable[[list], Any],
    partial: bool = False,
) -> Iterator[Any]:
    """Group (bucket_index, sample) pairs into batches of one bucket; leftovers are emitted at the end when partial."""
    pending: dict[int, list] = {}
    for index, sample in samples:
        group = pending.setdefault(index, [])
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            pending[index] = []
    if partial:
        for index in sorted(pending):
            if pending[index]:
                yield collate(pending[index])
