"""Webdataset streaming for DDP: resampled shards, a fixed number of batches per rank and epoch, skip counting.

Why this design (webdataset #75, #188, #250, #303, #379, #406):
- DDP hangs when one rank runs out of batches before the others. Every (rank, worker) stream therefore draws
  shards *with replacement* forever, and each rank takes exactly `batches_per_epoch` batches from its loader, so
  all ranks take the same number of optimizer steps and never run dry, whatever the shard count or sizes.
- Shards are split by node and worker when there are enough (rank r, worker w of W draws from
  `shards[r * W + w :: world_size * W]`); with fewer shards than `world_size * W` every stream draws from the whole
  list with its own seed instead of hanging on an empty partition.
- The epoch length is enforced on the loader side (the main process), not in each worker, so it is not multiplied
  by the worker count. rank and world_size are explicit arguments (accelerate's process_index / num_processes), not
  read from the environment, so tests simulate ranks in one process.
- Corrupt or incomplete samples never crash the loader: each worker counts them and the counts travel with the
  batches (`num_skipped`, `num_filtered`, `skip_reasons`); `StreamLoader.skips` adds them up in the main process.
"""
from __future__ import annotations

import glob
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.buckets import bucket_batches
from ldm.data.captions import drop_captions
from ldm.data.config import DataConfig
from ldm.data.samples import FilteredSample, SkipSample, collate, get_sample_format
from ldm.errors import LdmError
from ldm.runtime import derive_seed

LOADER_ERROR = "__loader_error__"  # a batch that carries a stream's LdmError message from its worker
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://")


def expand_shards(shards: str | Iterable[str]) -> list[str]:
    """Shard URLs from a path, directory (its *.tar), glob, brace pattern, "::"-joined list, URL or "pipe:" command."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        if not str(pattern).strip():  # no data given: said below, not as a shard named ""
            continue
        for url in wds.shardlists.expand_urls(str(pattern)):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
                continue
            path = os.path.expanduser(url.removeprefix("file:"))
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(path, "*.tar")))
                if not found:
                    raise LdmError(f"shard directory {path} holds no .tar files")
                urls.extend(found)
            elif any(c in path for c in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise LdmError(f"shard pattern {path} matches no file")
                urls.extend(found)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise LdmError(f"shard {path} not found (from DataConfig.shards={shards!r})")
    if not urls:
        raise LdmError("DataConfig.shards is empty: give a path, directory, brace pattern or URL of .tar shards "
                       "(--train-data, or data.shards in the config)")
    return urls


def shard_partition(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int, resampled: bool) -> list[str]:
    """The shards one (rank, worker) stream reads: its slice when there are enough, else all (resampled) or none."""
    streams = world_size * num_workers
    index = rank * num_workers + worker
    if len(urls) >= streams or not resampled:
        return urls[index::streams]
    return list(urls)


def shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `buffer_size` items (no-op when <= 1)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class SkipCounter:
    """Totals of skipped (corrupt/incomplete) and filtered samples, summed from the counts batches carry."""

    skipped: int = 0
    filtered: int = 0
    reasons: Counter = field(default_factory=Counter)

    def update(self, batch: dict) -> None:
        """Add one batch's `num_skipped`, `num_filtered` and `skip_reasons`."""
        self.skipped += int(batch.get("num_skipped", 0))
        self.filtered += int(batch.get("num_filtered", 0))
        self.reasons.update(batch.get("skip_reasons", {}))

    def as_dict(self) -> dict[str, int]:
        """Flat dict for logging: skipped, filtered and one entry per reason."""
        return {"skipped": self.skipped, "filtered": self.filtered, **{f"skip/{k}": v for k, v in sorted(self.reasons.items())}}


class _Tally:
    """Per-worker counts since the last batch left the worker."""

    def __init__(self) -> None:
        self.reasons: Counter = Counter()
        self.skipped = self.filtered = 0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1

    def filter(self, reason: str) -> None:
        self.filtered += 1
        self.reasons[f"filter_{reason}"] += 1

    def drain_into(self, batch: dict) -> dict:
        batch["num_skipped"] = batch.get("num_skipped", 0) + self.skipped
        batch["num_filtered"] = batch.get("num_filtered", 0) + self.filtered
        batch["skip_reasons"] = dict(Counter(batch.get("skip_reasons", {})) + self.reasons)
        self.__init__()
        return batch


class ShardStream(IterableDataset):
    """Batches of one (rank, worker) stream; runs inside a DataLoader worker or the main process."""

    def __init__(self, config: DataConfig, urls: list[str], rank: int = 0, world_size: int = 1):
        self.config, self.urls, self.rank, self.world_size = config, urls, rank, world_size
        self.sample_format = get_sample_format(config.sample_format)
        self.epoch = 0

    def _shard_order(self, shards: list[str], rng: random.Random) -> Iterator[str]:
        if not self.config.resampled:
            yield from shards
            return
        while True:
            yield shards[rng.randrange(len(shards))]

    def _raw_samples(self, shards: Iterator[str], tally: _Tally) -> Iterator[dict]:
        def on_error(exn: Exception) -> bool:
            tally.skip("tar_error")  # unreadable shard or tar member: counted, and reading goes on
            return True

        empty_streak = 0
        for url in shards:
            count = 0
            for raw in wds.tarfile_samples([{"url": url}], handler=on_error):
                count += 1
                yield raw
            empty_streak = 0 if count else empty_streak + 1
            if self.config.resampled and empty_streak >= self.config.max_empty_shards:
                raise LdmError(
                    f"{empty_streak} shards in a row gave no sample (last {url}); skip reasons so far: "
                    f"{dict(tally.reasons)}. Check DataConfig.shards."
                )

    def _samples(self, raws: Iterable[dict], tally: _Tally, rng: random.Random) -> Iterator[tuple[int, dict]]:
        rejected_streak = 0
        for raw in raws:
            try:
                item = self.sample_format(raw, self.config, rng)
            except SkipSample as e:
                tally.skip(e.reason)
            except FilteredSample as e:
                tally.filter(e.reason)
            else:
                rejected_streak = 0
                yield item
                continue
            rejected_streak += 1
            if self.config.resampled and rejected_streak >= self.config.max_rejected_streak:
                raise LdmError(
                    f"{rejected_streak} samples in a row were skipped or filtered ({dict(tally.reasons)}): "
                    "the shards hold no usable sample, or the filters are too strict"
                )

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._batches()
        except LdmError as e:  # e.g. no usable shard: the main process raises it (a worker's raise would reach the
            yield {LOADER_ERROR: str(e)}  # user wrapped in torch's "Caught LdmError in DataLoader worker" traceback)

    def _batches(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seed = derive_seed(self.config.seed, self.epoch, self.rank, worker)
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        shards = shard_partition(self.urls, self.rank, self.world_size, worker, num_workers, self.config.resampled)
        if not shards:
            return
        tally = _Tally()
        raws = shuffled(self._raw_samples(self._shard_order(shards, rng), tally), self.config.shuffle_buffer, rng)

        def finish(samples: list[dict]) -> dict:
            batch = collate(samples)
            if "caption" in batch:
                batch["caption"], batch["drop_mask"] = drop_captions(batch["caption"], self.config.caption_dropout, generator)
            return tally.drain_into(batch)

        held = None  # one batch held back so that counts after the last sample of a one-pass stream ride on it
        for batch in bucket_batches(self._samples(raws, tally, rng), self.config.batch_size, finish, partial=not self.config.resampled):
            if held is not None:
                yield held
            held = batch
        if held is not None:
            yield tally.drain_into(held)


class StreamLoader:
    """Iterable of batches for one rank: exactly `batches_per_epoch` per epoch when resampled, one pass otherwise."""

    def __init__(self, config: DataConfig, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise LdmError(f"rank {rank} is outside world_size {world_size}")
        self.config, self.world_size = config, world_size
        self.urls = expand_shards(config.shards)
        self.dataset = ShardStream(config, self.urls, rank, world_size)
        self.skips = SkipCounter()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration reads (shard draws, shuffles, crops and dropout depend on it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if not self.config.resampled:
            raise TypeError("a one-pass StreamLoader (resampled=False) has no fixed length")
        return self.config.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch, self.epoch = self.epoch, self.epoch + 1
        if self.config.num_workers == 0:
            source: Iterable[dict] = self.dataset
        else:
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the global torch RNG at
            # every epoch, so a resumed run (a fresh iterator mid-epoch) would shift that RNG, and with it dropout.
            workers_seed = derive_seed(self.config.seed, self.dataset.epoch, self.dataset.rank, "workers")
            source = DataLoader(self.dataset, batch_size=None, num_workers=self.config.num_workers, persistent_workers=False,
                                generator=torch.Generator().manual_seed(workers_seed))
        limit = self.config.batches_per_epoch if self.config.resampled else None
        for batch in islice(source, limit):  # the epoch ends here, on the loader, not in each worker (#303)
            if LOADER_ERROR in batch:
                raise LdmError(batch[LOADER_ERROR])
            self.skips.update(batch)
            yield batch


def make_loader(config: DataConfig, rank: int = 0, world_size: int = 1) -> StreamLoader:
    """Batches {"image": `b 3 h w` in [-1, 1], "caption": list[str], "key": list[str], "drop_mask", "num_skipped", ...}."""
    return StreamLoader(config, rank, world_size)
