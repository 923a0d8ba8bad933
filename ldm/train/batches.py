"""The training batch stream both trainers read: a resumable position in the loader's epochs, and skip counts."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from ldm.config import to_plain
from ldm.errors import LdmError


@dataclass
class TrainState:
    """What a checkpoint holds besides tensors: the step, where the data stream stands, what the loaders dropped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # loader epoch being read
    batch_in_epoch: int = 0  # batches of that epoch consumed
    samples: int = 0  # samples consumed by each rank (they number the per-sample noise seeds)
    skipped: int = 0  # corrupt samples the loaders skipped, all ranks
    filtered: int = 0  # samples the metadata filters dropped, all ranks
    reasons: dict[str, int] = field(default_factory=dict)  # skipped and filtered ("filter_<rule>") by reason
    stream: dict = field(default_factory=dict)  # what the data position counts in (stream_settings)

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        """The state a checkpoint's trainer_state.json holds (fields it predates keep their defaults)."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

    def data_counts(self) -> dict[str, int]:
        """Skipped and filtered totals and one `skip/<reason>` entry per reason, for logs and metrics."""
        return {"skipped": self.skipped, "filtered": self.filtered,
                **{f"skip/{k}": v for k, v in sorted(self.reasons.items())}}


# The data settings that decide which batches a position (epoch, batch) stands for.
STREAM_KEYS = ("batch_size", "num_workers", "batches_per_epoch", "seed", "resampled", "shuffle_buffer", "resolution",
               "buckets", "crop", "flip_prob", "caption_dropout")


def stream_settings(data, urls: list[str], world_size: int) -> dict:
    """The data stream a run reads: the settings above, the process count and the shard names (not their folder)."""
    names = "\n".join(os.path.basename(u) for u in urls)
    settings = to_plain({k: getattr(data, k) for k in STREAM_KEYS})
    settings["num_workers"] = max(1, data.num_workers)  # 0 reads in the main process the one stream 1 worker reads
    return {**settings, "processes": world_size,
            "shards": f"{len(urls)} shards, sha256 {hashlib.sha256(names.encode()).hexdigest()[:12]}"}


def note_stream_change(saved: dict, now: dict) -> None:
    """Warn when a resumed run reads another stream than the checkpoint's: its position then means other batches,
    and the run no longer equals an uninterrupted one (a checkpoint from before this record says nothing)."""
    changed = [f"{'data.' if k in STREAM_KEYS else ''}{k} {saved[k]} -> {now.get(k)}" for k in saved
               if saved[k] != now.get(k)]
    if changed:
        warnings.warn(f"the data stream differs from the checkpoint's ({'; '.join(changed)}): the run goes on from "
                      "its position, but reads other batches than the uninterrupted run would have", stacklevel=2)


def _epoch_length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # a one-pass loader (resampled=False) ends when its shards do
        return None


def batch_stream(loader, state: TrainState) -> Iterator[dict]:
    """Batches from the data position in `state` on, advancing it; a resumed run replays the epoch to its position.

    A checkpoint taken after the last batch of an epoch resumes at the next epoch without reading the finished one.
    """
    if _epoch_length(loader) is None and getattr(loader, "world_size", 1) > 1:
        raise LdmError(f"data.resampled=false reads each rank's shards once, so the {loader.world_size} ranks would "
                       "take different numbers of steps and DDP would hang at the end of the shorter pass; train with "
                       "data.resampled=true (the default: data.batches_per_epoch batches per rank and epoch)")
    while True:
        loader.set_epoch(state.epoch)  # shard draws, shuffles, crops and caption dropout are seeded per epoch
        length = _epoch_length(loader)
        if length is None or state.batch_in_epoch < length:
            read = 0
            for index, batch in enumerate(loader):
                read = index + 1
                if index < state.batch_in_epoch:
                    continue
                state.batch_in_epoch = index + 1
                yield batch
            if length is None and read == 0:  # a one-pass epoch gave nothing: the next would too, forever
                raise LdmError("one pass over the shards (data.resampled=false) gave no batch: they are empty or "
                               "unreadable, or every sample was skipped or filtered; check data.shards and the "
                               "filters")
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


class DataCounts:
    """Skipped and filtered samples this rank read since the last sync; `sync` adds every rank's into TrainState."""

    def __init__(self) -> None:
        self.pending: Counter = Counter()

    def add(self, batch: dict) -> None:
        """Count what the loader dropped before this batch (`num_skipped`, `num_filtered`, `skip_reasons`)."""
        self.pending["skipped"] += int(batch.get("num_skipped", 0))
        self.pending["filtered"] += int(batch.get("num_filtered", 0))
        self.pending.update({f"reason/{k}": int(v) for k, v in batch.get("skip_reasons", {}).items()})

    def sync(self, accelerator, state: TrainState) -> None:
        """Sum the pending counts over ranks into `state` (a collective: every rank calls it at the same steps)."""
        from accelerate.utils import gather_object

        every = gather_object([dict(self.pending)]) if accelerator.num_processes > 1 else [dict(self.pending)]
        total = sum((Counter(counts) for counts in every), Counter())
        state.skipped += total.pop("skipped", 0)
        state.filtered += total.pop("filtered", 0)
        reasons = Counter(state.reasons)
        reasons.update({k.removeprefix("reason/"): v for k, v in total.items()})
        state.reasons = {k: v for k, v in sorted(reasons.items()) if v}
        self.pending = Counter()
