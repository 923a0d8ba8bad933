"""Several machines: 2 simulated nodes x 2 processes over gloo train as one run; the shard split over nodes x GPUs x workers."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.data.loader import shard_partition
from ldm.data.synthetic import write_shape_shards

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_shards_split_over_nodes_gpus_and_workers():
    """The global rank (node * GPUs per node + local rank) and the worker pick one slice: every shard read once."""
    nodes, gpus, workers = 2, 2, 2
    urls = [f"shard-{i:02d}.tar" for i in range(16)]
    slices = {(node, gpu, w): shard_partition(urls, node * gpus + gpu, nodes * gpus, w, workers, resampled=True)
              for node in range(nodes) for gpu in range(gpus) for w in range(workers)}
    read = [u for part in slices.values() for u in part]
    assert sorted(read) == urls and len(set(read)) == len(urls)  # a partition: nothing twice, nothing left out
    assert {len(part) for part in slices.values()} == {2}
    # Fewer shards than the 8 streams: every stream resamples the whole list (an empty one would hang, webdataset #188).
    assert all(shard_partition(urls[:3], r, 4, w, 2, resampled=True) == urls[:3] for r in range(4) for w in range(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_two_processes_read_equal_batches_and_end_with_identical_replicas(tmp_path):
    shards = tmp_path / "shards"
    write_shape_shards(shards, 15, seed=0, image_size=32, samples_per_shard=6, image_format="png")  # 6, 6, 3 samples
    run, steps, batch = tmp_path / "run", 3, 2
    port = _free_port()
    train_args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-data", str(shards), "--output-dir", str(run),
                  "progress=false", "log_with=none", "sampling.at_end=false", f"max_steps={steps}",
                  "checkpoint_every=100", f"data.batch_size={batch}", "data.num_workers=2", "data.batches_per_epoch=2"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    # Two launchers, as on two machines: static rendezvous at node 0's address (127.0.0.1 here).
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(ROOT / "tests" / "record_batches.py"), str(tmp_path), *train_args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "parameters identical on all 4 ranks" in outputs[0]

    records = [json.loads((tmp_path / f"batches-rank-{r}.json").read_text()) for r in range(4)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(r, 4) for r in range(4)]  # global ranks across nodes
    for record in records:  # the same number of equal batches on every rank: no rank waits at an all-reduce
        assert [len(keys) for keys in record["batches"]] == [batch] * steps
    streams = [tuple(k for keys in r["batches"] for k in keys) for r in records]
    assert len(set(streams)) == 4  # each rank draws its own stream
    assert (run / "unet.safetensors").is_file()
