"""An SR stage resumed at its last step (the early-stop export of tools/device_train_sr.sh) exports without a grid."""
from pathlib import Path

import pytest

from ldm.config import apply_overrides, from_dict, load_yaml, to_plain
from ldm.data.synthetic import write_shape_shards
from ldm.io.native_format import check_manifest
from ldm.train.config import TrainConfig
from ldm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _config(shards: Path, out: Path, steps: int) -> TrainConfig:
    data = apply_overrides(load_yaml(ROOT / "configs" / "imagen-tiny-sr.yaml"),
                           ["progress=false", "log_with=none", "sampling.steps=1", "sampling.n_per_prompt=1",
                            "checkpoint_every=1", f"max_steps={steps}"])
    data["data"]["shards"], data["output_dir"] = str(shards), str(out)
    return from_dict(TrainConfig, data)


@pytest.mark.slow
def test_sr_stage_resumed_at_its_last_step_exports(tmp_path):
    shards = tmp_path / "shapes"
    write_shape_shards(shards, 6, seed=0, image_size=32, samples_per_shard=6, image_format="png")
    run = tmp_path / "sr"
    train(_config(shards, run, 2))
    (run / "unet.safetensors").unlink()  # as a run stopped by its time limit: checkpoints, no export
    (run / "manifest.json").unlink()
    # Resumed at step 2 with max_steps 2 it reads no training image, so it has none to upscale for the grid;
    # it used to draw a text-to-image grid, which an SR network refuses (no aug_level).
    train(_config(shards, run, 2), resume="latest")
    assert check_manifest(run, ["unet"]) == 2
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["samples-000002.png"]  # the first run's


def test_a_resumed_sr_stage_draws_the_uninterrupted_runs_preview_grid(tmp_path):
    # the grid upscales the run's first training images; a resumed run took its own first batch instead
    shards = tmp_path / "shapes"
    write_shape_shards(shards, 8, seed=0, image_size=32, samples_per_shard=4, image_format="png")
    grid = {"sampling.every": 2, "sampling.at_end": False, "data.batches_per_epoch": 1, "data.batch_size": 2}
    overrides = [f"{k}={v}" for k, v in grid.items()]

    def config(out, steps):
        return from_dict(TrainConfig, apply_overrides(to_plain(_config(shards, out, steps)), overrides))

    train(config(tmp_path / "full", 2))
    train(config(tmp_path / "resumed", 1))
    train(config(tmp_path / "resumed", 2), resume="latest")  # epoch 1: its first batch is not the run's first
    name = "samples/samples-000002.png"
    assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
