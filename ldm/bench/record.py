"""The benchmark record: one JSON line per benchmark and run, appended to docs/benchmarks/results.jsonl."""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ldm.atomic import atomic_write_text
from ldm.errors import LdmError

RESULTS = Path("docs/benchmarks/results.jsonl")
LOWER_IS_BETTER = ("ms", "s")  # time units; everything else (img/s, images/s) is a throughput
FIELDS = ("benchmark", "ours", "peer", "peer_name", "speedup", "unit", "mfu", "device", "torch", "date", "command")


@dataclass
class Row:
    """One benchmark's result; `speedup` > 1 means ours is faster, whatever the unit."""

    benchmark: str
    ours: float | None
    peer: float | None
    peer_name: str | None
    unit: str
    mfu: float | None  # model FLOP utilisation of ours: counted FLOPs per second / the device's measured peak
    device: str
    torch: str
    date: str
    command: str
    speedup: float | None = None
    details: dict = field(default_factory=dict)  # batch sizes, modes, the peer's variants, errors

    def __post_init__(self):
        if self.speedup is None:
            self.speedup = speedup(self.ours, self.peer, self.unit)


def speedup(ours: float | None, peer: float | None, unit: str) -> float | None:
    """How many times faster ours is: peer/ours for times, ours/peer for throughputs; None when a side is missing."""
    if not ours or not peer:
        return None
    return peer / ours if unit in LOWER_IS_BETTER else ours / peer


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's with its thread count (what a row was measured on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def now() -> str:
    """The UTC time in ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def make_row(benchmark: str, ours: float | None, peer: float | None, peer_name: str | None, unit: str, *,
             mfu: float | None, device: torch.device | str, command: str, details: dict | None = None) -> Row:
    """A row stamped with the device, the torch version and the time."""
    return Row(benchmark, ours, peer, peer_name, unit, mfu, device_name(device), torch.__version__, now(), command,
               details=dict(details or {}))


def row_json(row: Row) -> str:
    """The row as one JSON line: the fixed fields first, then `details`."""
    data = asdict(row)
    ordered = {k: data[k] for k in FIELDS}
    if data["details"]:
        ordered["details"] = data["details"]
    return json.dumps(ordered, allow_nan=False, default=str)


def append_rows(path: str | Path, rows: list[Row]) -> None:
    """Append `rows` to the JSONL file at `path` (created with its folder when missing), the whole file atomically."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, old + "".join(row_json(r) + "\n" for r in rows))


def read_rows(path: str | Path) -> list[dict]:
    """Every row of a results file, oldest first; a line that is not JSON is an error naming FILE:LINE."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise LdmError(f"{path}:{number}: not a JSON line ({e.msg}); fix or delete that line") from None
    return rows
