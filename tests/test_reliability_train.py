"""Careless use and crashes around training: run folders, damaged checkpoints, kill leftovers, skip counts, LPIPS."""
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import tiny_resumable_config, subprocess_env
from safetensors.torch import load_file

from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.errors import CheckpointError, ConfigError, LdmError
from ldm.train.batches import TrainState, batch_stream
from ldm.train.checkpointing import (MANIFEST_FILE, checkpoint_problem, list_checkpoints, read_trainer_state,
                                     rotate_checkpoints, tidy_checkpoints)
from ldm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = weights(a / name), weights(b / name)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), f"{name} differs"


@pytest.fixture(scope="module")
def two_steps(shape_shards, tmp_path_factory):
    """An uninterrupted 2-step run with a checkpoint after each step (the reference for every resume below)."""
    out = tmp_path_factory.mktemp("two-steps")
    train(tiny_resumable_config(shape_shards, out, "max_steps=2"))
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# --- the run folder -------------------------------------------------------------------------------------------------

def test_a_fresh_run_refuses_a_folder_holding_a_run_and_touches_nothing(shape_shards, two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(LdmError, match=r"already holds a run .*--resume latest.*--overwrite"):
        train(tiny_resumable_config(shape_shards, run, "max_steps=1"))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_overwrite_deletes_the_old_run_so_nothing_mixes(shape_shards, two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "samples-000099.png").write_bytes(b"old")
    train(tiny_resumable_config(shape_shards, run, "max_steps=1"), overwrite=True)
    assert [s for s, _ in list_checkpoints(run)] == [1]  # the old step 2 is gone, the new step 1 kept
    assert not (run / "samples" / "samples-000099.png").exists()
    assert load_yaml(run / "train_config.yaml")["max_steps"] == 1
    assert_same_weights(run / "checkpoints" / "step-000001", two_steps / "checkpoints" / "step-000001")


def test_overwrite_leaves_a_folder_that_is_not_a_run_alone(shape_shards, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LdmError, match="does not look like a run folder"):
        train(tiny_resumable_config(shape_shards, tmp_path, "max_steps=1"), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


CONFIGS = {"train": "tiny.yaml", "train_vae": "vae-tiny.yaml", "train_clip": "clip-emoji.yaml"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cli_output_dir_that_is_a_file_is_an_error_line_with_exit_2(name, tmp_path, capsys):
    config = ROOT / "configs" / CONFIGS[name]
    (tmp_path / "taken").write_text("x")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        code = tool(name).main(["--config", str(config), "--train-data", str(tmp_path), "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: --output-dir {out}") and "is a file" in err, err
    assert (tmp_path / "taken").read_text() == "x"


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(shape_shards, tmp_path, monkeypatch):
    import ldm.train.run_folder as run_folder

    def denied(*args, **kwargs):  # what a read-only mount or a folder of another user gives (root passes os.access)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "TemporaryFile", denied)
    with pytest.raises(LdmError, match=r"--output-dir .*/run cannot be written \(Permission denied\)"):
        train(tiny_resumable_config(shape_shards, tmp_path / "run", "max_steps=1"))
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cli_refuses_a_used_folder_and_resume_with_overwrite(name, tmp_path, capsys):
    config = ROOT / "configs" / CONFIGS[name]
    (tmp_path / "checkpoints").mkdir()
    code = tool(name).main(["--config", str(config), "--train-data", str(tmp_path), "--output-dir", str(tmp_path)])
    assert code == 2 and "already holds a run (checkpoints)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tool(name).main(["--config", str(config), "--output-dir", str(tmp_path), "--resume", "latest", "--overwrite"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cli_missing_or_no_shards_leave_no_folder_behind(name, tmp_path, capsys):
    """A mistyped shard path is refused before the run folder exists, so the corrected command is not refused."""
    config, out = ROOT / "configs" / CONFIGS[name], tmp_path / "run"
    for data, message in ((["--train-data", str(tmp_path / "typo")], "shard .*/typo not found"),
                          (["--train-data", ""], r"shards is empty: .*\(--train-data, or data.shards")):
        code = tool(name).main(["--config", str(config), *data, "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and re.search(message, err), err
        assert not out.exists()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_refused_resume_in_a_new_folder_leaves_it_empty_for_the_corrected_command(name, shape_shards, tmp_path,
                                                                                    capsys):
    """Every trainer finds the --resume checkpoint before it writes anything (the CLIP trainer's model record
    included): the folder stays empty, so the same command without --resume is not told it holds a run."""
    config, out = ROOT / "configs" / CONFIGS[name], tmp_path / "run"
    code = tool(name).main(["--config", str(config), "--train-data", shape_shards, "--output-dir", str(out),
                            "--resume", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "no such checkpoint folder" in err and "run without --resume" in err, err
    assert not out.exists() or list(out.iterdir()) == []


def test_an_image_size_the_unet_cannot_halve_is_refused_before_the_first_step(shape_shards, tmp_path):
    # 30 px / the autoencoder's 4 = 7.5 latents: it used to fail in the U-Net's skip concatenation at step 1
    for override, message in (("data.resolution=30", r"data.resolution: 30x30 is not a multiple of 8 .* try 32"),
                              ("data.buckets=[[32,40],[36,32]]", r"data.buckets: 36x32 is not a multiple of 8")):
        out = tmp_path / override.split("=")[0]
        with pytest.raises(ConfigError, match=message):
            train(tiny_resumable_config(shape_shards, out, "max_steps=1", override))
        assert list(out.iterdir()) == []  # the corrected command may use the same folder


@pytest.mark.parametrize("overrides, message", [
    (["sampling.eval_prompts=ldm_eval_v1"], "sampling.eval_prompts needs sampling.clip_pretrained"),
    (["sampling.eval_prompts=nosuchset", "sampling.clip_pretrained=none"], "prompt set 'nosuchset'"),
    (["sampling.eval_prompts=ldm_eval_v1", "sampling.clip_pretrained=/no/clip.bin"],
     "sampling.clip_pretrained /no/clip.bin: neither a file nor a known tag"),
    (["sampling.eval_prompts=ldm_eval_v1", "sampling.clip_pretrained=none", "sampling.ref_stats=/no/stats.npz"],
     "/no/stats.npz: cannot read statistics file"),
])
def test_evaluation_settings_are_checked_before_the_run_not_at_its_end(overrides, message, shape_shards, tmp_path):
    # these failed at the first sample grid: with sampling.every=0 after the last step, and before the export
    out = tmp_path / "run"
    with pytest.raises(LdmError, match=message):
        train(tiny_resumable_config(shape_shards, out, "max_steps=1", "sampling.at_end=true", *overrides))
    assert not out.exists()


@pytest.mark.parametrize("dim, extractor", [(768, None), (2048, "inception-v3-tf-2015-12-05+pil-bicubic")])
def test_reference_statistics_of_another_feature_space_are_refused_before_the_run(dim, extractor, shape_shards,
                                                                                   tmp_path):
    # the in-training FID measures the default resizer's 2048-d features: a 768-d pytorch-fid file or another
    # resizer's statistics failed only at the first grid (ldm-fid and ldm-eval refuse them before any work)
    import numpy as np

    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(dim), sigma=np.eye(dim), **({"extractor": extractor} if extractor else {}))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"sampling.ref_stats=.*ref.npz: holds {dim}-d statistics"):
        train(tiny_resumable_config(shape_shards, out, "max_steps=1", "sampling.at_end=true",
                                    "sampling.eval_prompts=ldm_eval_v1", "sampling.clip_pretrained=none",
                                    f"sampling.ref_stats={stats}"))
    assert not out.exists()


def test_grid_steps_the_schedule_cannot_sample_are_refused_before_the_first_step(shape_shards, tmp_path):
    out = tmp_path / "run"  # 5000 steps on 1000 training timesteps failed at the end of the run, before the export
    with pytest.raises(ConfigError, match=r"sampling \(the training's sample grids\): cannot sample 5000 steps"):
        train(tiny_resumable_config(shape_shards, out, "max_steps=1", "sampling.at_end=true", "sampling.steps=5000"))
    assert list(out.iterdir()) == []


def test_the_documented_exponent_learning_rate_is_read_as_a_number(shape_shards, tmp_path, capsys):
    # `tools/train.py --help` and docs/training.md give optim.lr=5e-5; PyYAML read it as the string '5e-5' (refused)
    out = tmp_path / "run"
    code = tool("train").main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-data", shape_shards,
                               "--output-dir", str(out), "optim.lr=5e-5", "max_steps=0", "progress=false",
                               "log_with=none", "sampling.at_end=false"])
    assert code == 0, capsys.readouterr().err
    assert load_yaml(out / "train_config.yaml")["optim"]["lr"] == 5e-5


def test_a_refused_start_leaves_the_old_run_and_its_record_alone(shape_shards, two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(LdmError, match="shard .*/typo not found"):  # --overwrite with a mistyped shard path
        train(tiny_resumable_config(str(tmp_path / "typo"), run, "max_steps=1"), overwrite=True)
    gone = run / "checkpoints" / "step-000009"
    with pytest.raises(CheckpointError, match=r"step-000009: no such checkpoint folder; use --resume latest "
                       r"\(the newest complete checkpoint\) or one of "):
        train(tiny_resumable_config(shape_shards, run, "max_steps=5"), resume=str(gone))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # train_config.yaml too
    fresh = tmp_path / "fresh"
    with pytest.raises(CheckpointError, match=r"no checkpoint is in .*fresh/checkpoints yet, so there is nothing "
                       r"to resume; run without --resume to start"):
        train(tiny_resumable_config(shape_shards, fresh, "max_steps=1"), resume=str(gone))
    assert list(fresh.iterdir()) == []


def test_rewinding_to_an_older_checkpoint_sets_the_newer_ones_aside(shape_shards, two_steps, tmp_path):
    # `--resume checkpoints/step-000001` (a rewind), then a preempted job's `--resume latest` continued step 2 of
    # the line that was left, not the new one
    run = copy_run(two_steps, tmp_path / "run")
    with pytest.warns(UserWarning, match="step-000002 is newer than the resumed step 1: renamed"):
        train(tiny_resumable_config(shape_shards, run, "max_steps=1"), resume=str(run / "checkpoints" / "step-000001"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["abandoned-step-000002", "step-000001"]
    assert [s for s, _ in list_checkpoints(run)] == [1]
    train(tiny_resumable_config(shape_shards, run, "max_steps=2"), resume="latest")  # from step 1, the new line
    assert_same_weights(run / "checkpoints" / "step-000002", two_steps / "checkpoints" / "step-000002")


def test_resuming_at_or_past_max_steps_says_nothing_is_trained(shape_shards, two_steps, tmp_path):
    # `--resume latest --max-steps 1` on a run at step 2 trained nothing and exported step 2 without a word
    run = copy_run(two_steps, tmp_path / "run")
    with pytest.warns(UserWarning, match=r"at step 2, at or past max_steps=1: nothing is trained.*--max-steps above 2"):
        train(tiny_resumable_config(shape_shards, run, "max_steps=1"), resume="latest")
    assert_same_weights(run / "checkpoints" / "step-000002", two_steps / "checkpoints" / "step-000002")


def test_resuming_with_another_data_stream_says_so(shape_shards, two_steps, tmp_path):
    # data.num_workers (another machine) or data.batch_size changed on resume: the data position then names other
    # batches, and the run silently stopped being the uninterrupted one
    run = copy_run(two_steps, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-000002")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(tiny_resumable_config(shape_shards, run, "max_steps=2"), resume="latest")
    assert not [w for w in record if "data stream" in str(w.message)]
    assert_same_weights(run / "checkpoints" / "step-000002", two_steps / "checkpoints" / "step-000002")
    with pytest.warns(UserWarning, match=r"data stream differs from the checkpoint's \(data.num_workers 1 -> 2\)"):
        train(tiny_resumable_config(shape_shards, run, "max_steps=3", "data.num_workers=2"), resume="latest")


def test_resuming_with_another_model_config_is_refused_briefly_and_keeps_the_runs_record(shape_shards, two_steps,
                                                                                         tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    before = (run / "train_config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match="holds another model than the config describes") as raised:
        train(tiny_resumable_config(shape_shards, run, "max_steps=3", "model.unet.model_channels=64"), resume="latest")
    assert len(str(raised.value).splitlines()) < 10  # not the 200 lines of size mismatches
    assert "resume with the config the run was trained with" in str(raised.value)
    assert (run / "train_config.yaml").read_bytes() == before  # it was overwritten with the refused config


@pytest.mark.slow
def test_under_torchrun_the_error_line_ends_the_launcher_summary(tmp_path):
    """torchrun (what `accelerate launch --multi_gpu` runs) ends with the child's error line, not a stock hint."""
    import subprocess

    (tmp_path / "taken").write_text("x")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(ROOT / "tools" / "train.py"),
           "--config", str(ROOT / "configs" / "tiny.yaml"), "--output-dir", str(tmp_path / "taken")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and set(line.strip()) != {"="}]
    assert lines[-1].strip() == f"traceback : error: --output-dir {tmp_path / 'taken'} is a file, not a folder; " \
                                "remove it or choose another name"


# --- damaged checkpoints ------------------------------------------------------------------------------------------

def test_resume_latest_skips_a_truncated_checkpoint_and_ends_as_the_uninterrupted_run(shape_shards, two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    model = run / "checkpoints" / "step-000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1000])  # a checkpoint write cut short by a full disk, say
    with pytest.warns(UserWarning, match=r"step-000002/model.safetensors is truncated.*resuming from .*step-000001"):
        train(tiny_resumable_config(shape_shards, run, "max_steps=2"), resume="latest")
    assert_same_weights(run / "checkpoints" / "step-000002", two_steps / "checkpoints" / "step-000002")
    assert checkpoint_problem(run / "checkpoints" / "step-000002") is None


def test_resume_from_damaged_checkpoints_names_the_file(shape_shards, two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    step1, step2 = run / "checkpoints" / "step-000001", run / "checkpoints" / "step-000002"
    (step2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"step-000002/model.safetensors is missing") as error:
        train(tiny_resumable_config(shape_shards, run, "max_steps=3"), resume=str(step2))
    assert "pytorch_model" not in str(error.value)
    (step1 / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no checkpoint .* is complete .*step-000002/model.safetensors is "
                                              r"missing.*step-000001/optimizer.bin is truncated"):
        train(tiny_resumable_config(shape_shards, run, "max_steps=3"), resume="latest")


def test_a_checkpoint_from_before_the_file_list_is_still_checked(two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    step = run / "checkpoints" / "step-000002"
    assert json.loads((step / MANIFEST_FILE).read_text())["model.safetensors"] > 0
    (step / MANIFEST_FILE).unlink()
    assert checkpoint_problem(step) is None
    (step / "ema.safetensors").write_bytes((step / "ema.safetensors").read_bytes()[:-10])
    assert "ema.safetensors is damaged" in checkpoint_problem(step)
    (step / "model.safetensors").unlink()
    assert checkpoint_problem(step).endswith("model.safetensors is missing")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["malicious", "deleted"])
def test_an_unusable_rng_state_warns_and_the_resume_stays_exact(damage, shape_shards, two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-000002")
    rng = run / "checkpoints" / "step-000001" / "random_states_0.pkl"
    marker = tmp_path / "pwned"
    if damage == "malicious":
        rng.write_bytes(pickle.dumps(_Evil(marker)))
    else:
        rng.unlink()
    with pytest.warns(UserWarning, match=r"random_states_0.pkl (cannot be loaded safely|is missing).*fresh RNG state"):
        train(tiny_resumable_config(shape_shards, run, "max_steps=2"), resume="latest")
    assert not marker.exists()  # the pickle never ran
    assert_same_weights(run / "checkpoints" / "step-000002", two_steps / "checkpoints" / "step-000002")


# --- what a kill leaves behind ---------------------------------------------------------------------------------------

def test_a_kill_during_rotation_leaves_no_checkpoint_that_looks_complete(two_steps, tmp_path, monkeypatch):
    import ldm.train.checkpointing as checkpointing

    run = copy_run(two_steps, tmp_path / "run")
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.endswith(".deleting") and Path(path).exists():
            (Path(path) / "trainer_state.json").unlink()  # the kill lands half-way through the delete
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(run, limit=1)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert (run / "checkpoints" / ".step-000001.deleting").is_dir()
    notes = tidy_checkpoints(run)
    assert len(notes) == 1 and "removed" in notes[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


def test_the_next_start_tidies_what_kills_left_and_resumes(shape_shards, two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    ckpts = run / "checkpoints"
    (ckpts / "step-000005").mkdir()  # an emptied folder, as the old rotation left it
    (ckpts / ".step-000003.tmp").mkdir()  # killed while writing step 3
    (ckpts / ".step-000003.tmp" / "model.safetensors").write_bytes(b"partial")
    os.replace(ckpts / "step-000002", ckpts / ".step-000002.old")  # killed while saving step 2 again
    with pytest.warns(UserWarning) as record:
        train(tiny_resumable_config(shape_shards, run, "max_steps=2"), resume="latest")
    messages = " ".join(str(w.message) for w in record)
    assert "restored" in messages and "step-000005" in messages and ".step-000003.tmp" in messages
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002"]
    # step 2 was restored and resumed from (nothing left to train): it is the uninterrupted run's
    assert_same_weights(ckpts / "step-000002", two_steps / "checkpoints" / "step-000002")


def test_a_kill_during_the_export_is_redone_by_the_next_start(shape_shards, two_steps, tmp_path):
    from ldm.io.formats import load_model

    run = copy_run(two_steps, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000002" / "trainer_state.json"
    written = checkpoint.stat().st_mtime_ns
    for path in run.glob("*.safetensors"):  # the exported weights, as a kill before they were all written leaves them
        path.unlink()
    train(tiny_resumable_config(shape_shards, run, "max_steps=2"), resume="latest")
    assert checkpoint.stat().st_mtime_ns == written  # 0 steps trained, the checkpoint untouched
    assert load_model(run) is not None  # the export is whole again (loading checks it)


KILL = """
import os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
import ldm.train.checkpointing as ckpt
import ldm.train.loop as loop
from helpers import tiny_resumable_config

point, shape_shards, out, overrides = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
write_synced, rmtree = ckpt._write_synced, shutil.rmtree


def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def write_then_kill(path, text):  # every file of step 2 written, its trainer_state.json not yet
    if path.name == ckpt.STATE_FILE and '"step": 2' in text:
        kill()
    write_synced(path, text)


def rmtree_then_kill(path, *args, **kwargs):  # step 1 renamed for deletion, not yet deleted
    if str(path).endswith(".deleting") and os.path.exists(path):
        kill()
    rmtree(path, *args, **kwargs)


if point == "checkpoint":
    ckpt._write_synced = write_then_kill
elif point == "rotation":
    ckpt.shutil.rmtree = rmtree_then_kill
elif point == "export":
    loop.export_model = kill
loop.train(tiny_resumable_config(shape_shards, out, *overrides))
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint", "rotation", "export"])
def test_kill_9_at_each_point_then_resume_latest_ends_as_the_uninterrupted_run(point, shape_shards, two_steps, tmp_path):
    import subprocess

    run = tmp_path / "run"
    limit = ["checkpoints_total_limit=1"] if point == "rotation" else []
    cmd = [sys.executable, "-c", KILL, str(ROOT / "tests"), point, shape_shards, str(run), "max_steps=2", *limit]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == -9, result.stderr[-2000:]
    ckpts = run / "checkpoints"
    left = {"checkpoint": [".step-000002.tmp", "step-000001"], "rotation": [".step-000001.deleting", "step-000002"],
            "export": ["step-000001", "step-000002"]}[point]
    assert sorted(p.name for p in ckpts.iterdir()) == left
    train(tiny_resumable_config(shape_shards, run, "max_steps=2", *limit), resume="latest")
    assert [s for s, _ in list_checkpoints(run)] == ([2] if limit else [1, 2])
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the leftovers were tidied
    assert_same_weights(ckpts / "step-000002", two_steps / "checkpoints" / "step-000002")
    from ldm.io.formats import load_model

    assert load_model(run) is not None  # the export is there and whole


# --- one batch stream, skip counts by reason -----------------------------------------------------------------------

class CountingLoader:
    """Three batches per epoch, numbered (epoch, index); counts how many batches were read in all."""

    def __init__(self):
        self.epoch, self.reads = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 3

    def __iter__(self):
        for index in range(3):
            self.reads += 1
            yield {"id": (self.epoch, index)}


def test_resuming_after_a_finished_epoch_does_not_reread_it():
    import ldm.train.vae_loop as vae_loop

    assert not hasattr(vae_loop, "batch_stream") or vae_loop.batch_stream is batch_stream  # one home
    loader = CountingLoader()
    state = TrainState(epoch=0, batch_in_epoch=3)  # a checkpoint taken after the last batch of epoch 0
    assert next(batch_stream(loader, state))["id"] == (1, 0)
    assert loader.reads == 1 and (state.epoch, state.batch_in_epoch) == (1, 1)
    state = TrainState(epoch=2, batch_in_epoch=1)  # mid-epoch: replays to the position
    assert next(batch_stream(loader, state))["id"] == (2, 1)


class OnePassLoader:
    """A one-pass loader (no length, as data.resampled=false) of `batches` batches per epoch."""

    def __init__(self, batches: int, world_size: int = 1):
        self.batches, self.world_size = batches, world_size

    def set_epoch(self, epoch):
        assert epoch < 10, "the stream went on to epoch 10 of a data set that gives nothing"

    def __iter__(self):
        yield from ({"id": i} for i in range(self.batches))


def test_a_one_pass_stream_that_gives_nothing_is_an_error_not_an_endless_loop():
    # data.resampled=false on shards with no usable sample: the trainer spun at 100% CPU forever, printing nothing
    assert [b["id"] for b, _ in zip(batch_stream(OnePassLoader(2), TrainState()), range(5))] == [0, 1, 0, 1, 0]
    with pytest.raises(LdmError, match=r"data.resampled=false\) gave no batch"):
        next(batch_stream(OnePassLoader(0), TrainState()))
    with pytest.raises(LdmError, match="DDP would hang"):  # ranks' one-pass streams differ in length
        next(batch_stream(OnePassLoader(2, world_size=2), TrainState()))


def test_trainer_state_of_an_old_checkpoint_loads_with_defaults():
    state = TrainState.from_saved({"step": 4, "epoch": 1, "batch_in_epoch": 2, "unknown": 1})
    assert (state.step, state.skipped, state.reasons) == (4, 0, {})


def bad_shard(folder: Path) -> Path:
    """One shard: a truncated JPEG, garbage named .jpg, five good samples, then an image without a caption."""
    from PIL import Image

    from ldm.data.shards import AtomicShardWriter, encode_image, make_record
    from ldm.data.synthetic import generate_shapes

    jpeg = encode_image(Image.new("RGB", (32, 32), (200, 10, 10)), "jpg")
    with AtomicShardWriter(folder) as writer:
        writer.write(make_record("bad_truncated", jpeg[: len(jpeg) // 2], "jpg", "a truncated red square", {}))
        writer.write(make_record("bad_garbage", b"not a jpeg" * 10, "jpg", "garbage bytes", {}))
        for s in generate_shapes(5, seed=2, image_size=16):
            writer.write(make_record(s.key, encode_image(s.image, "png"), "png", s.caption, {}))
        writer.write({"__key__": "bad_nocaption", "jpg": jpeg})
    return folder


def test_vae_training_counts_skipped_samples_by_reason(tmp_path, monkeypatch):
    from ldm.train.vae_loop import VAETrainConfig, train_autoencoder

    monkeypatch.delenv("LDM_LPIPS_WEIGHTS", raising=False)
    folder = bad_shard(tmp_path / "bad")
    data = apply_overrides(load_yaml(ROOT / "configs" / "vae-tiny.yaml"), [
        "progress=false", "log_with=none", "model.resolution=16", "data.resolution=16", "data.batches_per_epoch=3",
        "data.shuffle_buffer=0", "max_steps=3", "checkpoint_every=3", "scale_batches=1", "loss.perceptual_weight=1.0"])
    data["data"]["shards"] = str(folder)
    data["output_dir"] = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train_autoencoder(from_dict(VAETrainConfig, data))
    metrics = json.loads((out / "metrics.json").read_text())
    state = read_trainer_state(out / "checkpoints" / "step-000003")
    # 6 samples read: the truncated and the garbage JPEG, 5 good ones, no caption, the two bad JPEGs again, 1 good
    assert metrics["skipped"] == state["skipped"] == 5
    assert metrics["skip/corrupt_image"] == state["reasons"]["corrupt_image"] == 4
    assert metrics["skip/no_caption"] == state["reasons"]["no_caption"] == 1
    assert metrics["skipped"] == sum(state["reasons"].values())
    # LPIPS weights absent: what ran is recorded, not what was asked for
    assert load_yaml(out / "config.yaml")["loss"]["perceptual_weight"] == 0.0
    assert metrics["perceptual_weight"] == 0.0 and "without the perceptual loss" in metrics["notes"][0]
