"""Streaming loader: equal batch counts per rank, one-pass coverage, corrupt samples skipped and counted, dropout, buckets."""

import pytest
import torch
from helpers import write_bad_shard
from PIL import Image

from ldm.data.config import DataConfig
from ldm.data.loader import expand_shards, make_loader, shard_partition
from ldm.data.shards import AtomicShardWriter, encode_image, make_record
from ldm.data.synthetic import generate_shapes
from ldm.errors import ConfigError, LdmError


def write_uneven_shards(tmp_path, sizes, image_size=32):
    """Shards of the given sample counts (keys are global indices); returns the folder and all keys."""
    samples = generate_shapes(sum(sizes), seed=1, image_size=image_size)
    keys = []
    for index, size in enumerate(sizes):
        with AtomicShardWriter(tmp_path, start_shard=index) as writer:
            for _ in range(size):
                s = next(samples)
                writer.write(make_record(s.key, encode_image(s.image, "png"), "png", s.caption, {"width": image_size, "height": image_size}))
                keys.append(s.key)
    return tmp_path, keys


def config(shards, **kw):
    base = dict(shards=str(shards), batch_size=3, num_workers=0, resolution=32, shuffle_buffer=4, batches_per_epoch=5, seed=0)
    return DataConfig(**{**base, **kw})


def test_equal_batch_counts_for_two_ranks_with_fewer_shards_than_streams(tmp_path):
    folder, _ = write_uneven_shards(tmp_path, [7, 1, 4])  # 3 uneven shards < 2 ranks x 2 workers
    assert len(expand_shards(str(folder))) == 3
    streams = {}
    for rank in (0, 1):
        loader = make_loader(config(folder, num_workers=2), rank=rank, world_size=2)
        for epoch in range(2):
            batches = list(loader)
            assert len(batches) == len(loader) == 5
            for b in batches:
                assert b["image"].shape == (3, 3, 32, 32) and b["image"].dtype == torch.float32
                assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
                assert len(b["caption"]) == len(b["key"]) == 3
            streams[rank, epoch] = [k for b in batches for k in b["key"]]
    assert streams[0, 0] != streams[1, 0]  # ranks draw different streams
    assert streams[0, 0] != streams[0, 1]  # and a new epoch draws a new one
    again = make_loader(config(folder, num_workers=2), rank=1, world_size=2)
    assert [k for b in again for k in b["key"]] == streams[1, 0]  # deterministic given the seed


def test_worker_loader_leaves_the_global_torch_rng_alone(tmp_path):
    # A DataLoader draws its workers' base seed from the global RNG at every new iterator; a resumed run makes one
    # mid-epoch where the uninterrupted run made none, so its dropout masks differed (resume was not exact).
    folder, _ = write_uneven_shards(tmp_path, [4, 4])
    loader = make_loader(config(folder, num_workers=1, batches_per_epoch=1))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [k for b in loader for k in b["key"]]
    assert torch.equal(torch.get_rng_state(), state)
    loader.set_epoch(0)
    assert [k for b in loader for k in b["key"]] == first  # the stream itself is still seeded per epoch


def test_shard_partition_splits_by_node_and_worker():
    urls = [f"s{i}" for i in range(8)]
    parts = [shard_partition(urls, r, 2, w, 2, resampled=True) for r in range(2) for w in range(2)]
    assert sorted(u for p in parts for u in p) == urls and all(len(p) == 2 for p in parts)
    assert shard_partition(urls[:3], 1, 2, 1, 2, resampled=True) == urls[:3]  # too few: all, never empty
    assert shard_partition(urls[:3], 1, 2, 1, 2, resampled=False) == []


def test_one_pass_reads_every_sample_exactly_once_across_ranks(tmp_path):
    folder, keys = write_uneven_shards(tmp_path, [5, 2, 4])
    seen = []
    for rank in (0, 1):
        for b in make_loader(config(folder, resampled=False), rank=rank, world_size=2):
            seen += b["key"]
    assert sorted(seen) == sorted(keys)


def test_corrupt_and_incomplete_samples_are_skipped_and_counted_once(tmp_path):
    folder = write_bad_shard(tmp_path)
    loader = make_loader(config(folder, resampled=False, batch_size=2, shuffle_buffer=0))
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 5
    assert [b["num_skipped"] for b in batches] == [2, 0, 1]  # the trailing skip rides on the last batch
    assert loader.skips.skipped == 3 and loader.skips.filtered == 0
    assert loader.skips.reasons == {"corrupt_image": 2, "no_caption": 1}


def test_resampled_stream_counts_skips_in_every_batch(tmp_path):
    folder = write_bad_shard(tmp_path)
    loader = make_loader(config(folder, batch_size=5, shuffle_buffer=0, batches_per_epoch=4))
    batches = list(loader)
    # one shard pass per batch; the skip after the last good sample of a pass lands in the next batch
    assert [b["num_skipped"] for b in batches] == [2, 3, 3, 3]
    assert loader.skips.skipped == 11


def test_unusable_shards_raise_instead_of_looping_forever(tmp_path):
    with AtomicShardWriter(tmp_path) as writer:
        writer.write({"__key__": "a", "jpg": b"garbage"})
    with pytest.raises(LdmError, match="in a row"):
        list(make_loader(config(tmp_path, max_rejected_streak=50)))
    with pytest.raises(LdmError, match="not found"):
        make_loader(config(tmp_path / "missing.tar"))
    with pytest.raises(ConfigError):
        config(tmp_path, crop="top")


def test_a_worker_that_finds_no_usable_shard_raises_its_own_message_in_the_main_process(tmp_path):
    # it used to arrive as "Caught LdmError in DataLoader worker process 0. Original Traceback ..." (20 lines)
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00001.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(LdmError) as raised:
        list(make_loader(config(tmp_path, num_workers=1, max_empty_shards=4)))
    assert str(raised.value).startswith("4 shards in a row gave no sample (last ")
    assert "Traceback" not in str(raised.value) and "DataLoader worker" not in str(raised.value)


def test_caption_dropout_is_deterministic_and_matches_the_mask(tmp_path):
    folder, _ = write_uneven_shards(tmp_path, [6, 6])
    runs = [[(b["caption"], b["drop_mask"].tolist()) for b in make_loader(config(folder, caption_dropout=0.5, seed=s))] for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    captions = [c for caps, _ in runs[0] for c in caps]
    mask = [m for _, ms in runs[0] for m in ms]
    assert [c == "" for c in captions] == mask and 0 < sum(mask) < len(mask)


def test_filters_drop_samples_in_the_loader_and_are_counted(tmp_path):
    with AtomicShardWriter(tmp_path) as writer:
        for i, s in enumerate(generate_shapes(6, seed=3, image_size=32)):
            meta = {"similarity": 0.1 * i, "original_width": 32, "original_height": 32}
            writer.write(make_record(s.key, encode_image(s.image, "png"), "png", s.caption, meta))
    loader = make_loader(config(tmp_path, resampled=False, min_similarity=0.25))
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in (3, 4, 5)]
    assert loader.skips.filtered == 3 and loader.skips.reasons == {"filter_similarity": 3}


def test_aspect_ratio_buckets_group_batches_by_shape(tmp_path):
    sizes = {"wide": (64, 32), "tall": (32, 64), "square": (40, 40)}  # (w, h)
    with AtomicShardWriter(tmp_path) as writer:
        for i in range(12):
            name = list(sizes)[i % 3]
            image = Image.new("RGB", sizes[name], (i * 20, 0, 0))
            writer.write(make_record(f"{name}_{i}", encode_image(image, "png"), "png", name, {}))
    buckets = [(32, 32), (32, 64), (64, 32)]  # (h, w)
    expected = {"square": (32, 32), "wide": (32, 64), "tall": (64, 32)}
    batches = list(make_loader(config(tmp_path, buckets=buckets, batch_size=2, batches_per_epoch=12)))
    assert len(batches) == 12
    for b in batches:
        names = {k.split("_")[0] for k in b["key"]}
        assert len(names) == 1
        assert tuple(b["image"].shape[-2:]) == expected[names.pop()]


def test_data_config_from_yaml_dict(tmp_path):
    from ldm.config import from_dict

    cfg = from_dict(DataConfig, {"shards": ["a.tar", "b.tar"], "buckets": [[32, 64], [64, 32]], "flip_prob": 1})
    assert cfg.shards == ["a.tar", "b.tar"] and cfg.buckets == [(32, 64), (64, 32)] and cfg.flip_prob == 1.0
    assert cfg.sizes == [(32, 64), (64, 32)] and DataConfig(resolution=48).sizes == [(48, 48)]
    with pytest.raises(ConfigError, match="shuffle_bufer"):
        from_dict(DataConfig, {"shuffle_bufer": 10})
    with pytest.raises(ConfigError, match="no_such_format"):
        make_loader(config(write_uneven_shards(tmp_path, [1])[0], sample_format="no_such_format"))
