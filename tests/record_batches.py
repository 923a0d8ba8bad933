"""Run tools/train.py and record what batches this rank read (a torchrun worker for tests/test_multi_node.py).

Writes OUT/batches-rank-R.json: the rank and world size the loader was given and, per batch, its sample keys.

    torchrun --nnodes 2 --node_rank 0 ... tests/record_batches.py OUT --config ... (then the same with node_rank 1)
"""
import json
import sys
from pathlib import Path

import ldm.train.loop as loop

ROOT = Path(__file__).resolve().parents[1]
_make_loader = loop.make_loader


class RecordingLoader:
    """A training loader that keeps the keys of every batch it hands out."""

    def __init__(self, config, rank, world_size):
        self.loader, self.rank, self.world_size, self.batches = _make_loader(config, rank, world_size), rank, world_size, []

    @property
    def urls(self):  # the shards, which the trainer records with the data stream (as the real loader has them)
        return self.loader.urls

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(list(batch["key"]))
            yield batch


if __name__ == "__main__":
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    made = []

    def recording(config, rank=0, world_size=1):
        made.append(RecordingLoader(config, rank, world_size))
        return made[-1]

    loop.make_loader = recording
    sys.path.insert(0, str(ROOT / "tools"))
    import train

    code = train.main(argv)
    for loader in made:
        record = {"rank": loader.rank, "world_size": loader.world_size, "batches": loader.batches}
        (out / f"batches-rank-{loader.rank}.json").write_text(json.dumps(record))
    sys.exit(code)
