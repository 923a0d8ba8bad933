"""Seeds derived from a run's seed: one per (rank, sample, epoch, worker, ...), equal in every process and Python run."""
from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from `parts` (e.g. seed, rank, sample index); SHA-256, so not Python's salted `hash`."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
