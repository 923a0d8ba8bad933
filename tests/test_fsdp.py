"""FSDP2 through accelerate: the sample configs, the checks, and 2 gloo processes training as DDP does (CPU)."""
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close_to_ref, subprocess_env
from safetensors.torch import load_file

from ldm.data.synthetic import write_shape_shards
from ldm.errors import ConfigError
from ldm.io.formats import load_model
from ldm.train.sharding import is_sharded

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"


def launch_env(config_file: Path, processes: int) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE` gives its processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes", str(processes),
                                               "--main_process_port", "0", "--mixed_precision", "no", "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_the_sample_configs_choose_fsdp2_with_sharded_checkpoints_or_ddp():
    fsdp = launch_env(CONFIGS / "fsdp2.yaml", 2)
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_VERSION"] == "2"
    assert fsdp["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert fsdp["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "UNetModel,ResBlock,SpatialTransformer"
    assert launch_env(CONFIGS / "ddp.yaml", 2).get("ACCELERATE_USE_FSDP", "false") == "false"


def _accelerator(kind: str, **plugin):
    from accelerate.utils import DistributedType

    fsdp = {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT", **plugin}
    return SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**fsdp)))


def test_fsdp1_and_full_state_dict_checkpoints_are_refused_with_the_field_to_change():
    assert is_sharded(_accelerator("FSDP")) and not is_sharded(_accelerator("MULTI_GPU"))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        is_sharded(_accelerator("FSDP", fsdp_version=1))
    with pytest.raises(ConfigError, match="SHARDED_STATE_DICT"):
        is_sharded(_accelerator("FSDP", state_dict_type="FULL_STATE_DICT"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(script: str, run: Path, shards: Path, steps: int, *extra: str, env: dict | None = None) -> str:
    """tools/train.py (or a worker around it) on 2 CPU processes over gloo; returns the output of both."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / script), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--train-data", str(shards), "--output-dir", str(run), "progress=false", "log_with=none",
           "sampling.at_end=false", "data.batches_per_epoch=2", "checkpoint_every=2", "ema.decay=0.5",
           f"max_steps={steps}", *extra]
    env = subprocess_env(**(env or {}), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{role}.{k}": v for role in ("unet", "text_encoder") for k, v in load_file(run / f"{role}.safetensors").items()}


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_trains_as_ddp_resumes_exactly_and_exports_the_whole_model(tmp_path):
    """4 steps under DDP, under FSDP2, and under FSDP2 as 2 steps + a resumed 2: the exported EMA models agree."""
    shards = tmp_path / "shards"
    write_shape_shards(shards, 12, seed=0, image_size=32, samples_per_shard=6, image_format="png")
    fsdp_env = {k: v for k, v in launch_env(CONFIGS / "fsdp2.yaml", 2).items() if k.startswith(("ACCELERATE_", "FSDP_"))}

    _train("tools/train.py", tmp_path / "ddp", shards, 4)
    out = _train("tests/fsdp_on_cpu.py", tmp_path / "fsdp", shards, 4, "sampling.at_end=true", env=fsdp_env)
    units = "DiffusionObjective 1, UNetModel 1, ResBlock 8, SpatialTransformer 4, SmallTextEncoder 1"
    assert f"FSDP2 over 2 ranks, units: {units}\n" in out
    assert (tmp_path / "fsdp" / "samples" / "samples-000004.png").is_file()  # previews sample the sharded U-Net
    _train("tests/fsdp_on_cpu.py", tmp_path / "resumed", shards, 2, env=fsdp_env)
    out = _train("tests/fsdp_on_cpu.py", tmp_path / "resumed", shards, 4, "--resume", "latest", env=fsdp_env)
    assert "resumed from" in out and "step-000002" in out

    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-000004"  # sharded: accelerate's DCP folders, EMA per rank
    for name in ("pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata", "ema-rank-0-of-2.safetensors",
                 "ema-rank-1-of-2.safetensors"):
        assert (checkpoint / name).is_file(), name
    assert not (checkpoint / "model.safetensors").exists()

    ddp, fsdp, resumed = (_weights(tmp_path / name) for name in ("ddp", "fsdp", "resumed"))
    assert ddp.keys() == fsdp.keys() == resumed.keys()
    for key in ddp:  # the whole tensors, unsharded, as DDP writes them
        assert fsdp[key].shape == ddp[key].shape, key
        assert torch.equal(resumed[key], fsdp[key]), key  # exact resume: model, optimizer, EMA, data position
    # Reduce-scatter vs all-reduce: float32 rounding only, on the scale of the weights (Adam turns rounding in a
    # near-zero gradient into an lr-sized step, so a near-zero tensor alone is no scale to measure against).
    flat = {name: torch.cat([run[k].flatten() for k in sorted(run)]) for name, run in (("ddp", ddp), ("fsdp", fsdp))}
    assert_close_to_ref(flat["fsdp"], flat["ddp"], what="trained weights")
    moved = max((ddp[k] - load_file(tmp_path / "ddp" / "checkpoints" / "step-000002" / "ema.safetensors")
                 [f"shadow.denoiser.network.{k[5:]}"]).abs().max().item() for k in ddp if k.startswith("unet."))
    assert moved > 1e-4  # the comparison is of trained weights, not of the initial ones
    parts = load_model(tmp_path / "resumed")  # the export is an ordinary native model folder
    assert not any(type(p).__name__ == "DTensor" for p in parts["unet"].parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (accelerate's FSDP on NCCL)")
@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp2_config_matches_the_ddp_config_on_two_gpus(tmp_path):
    shards = tmp_path / "shards"
    write_shape_shards(shards, 12, seed=0, image_size=32, samples_per_shard=6, image_format="png")
    runs = {}
    for name in ("ddp", "fsdp2"):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{name}.yaml"),
               "--num_processes", "2", "--main_process_port", "0", "--mixed_precision", "no",
               str(ROOT / "tools" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), "--train-data",
               str(shards), "--output-dir", str(tmp_path / name), "progress=false", "log_with=none",
               "sampling.at_end=false", "max_steps=4", "allow_tf32=false",
               "compile=false"]  # sharding is under test, not inductor: two eager runs, no minutes of compiling
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                                env=subprocess_env())
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        runs[name] = _weights(tmp_path / name)
    flat = {name: torch.cat([run[k].flatten() for k in sorted(run)]) for name, run in runs.items()}
    assert_close_to_ref(flat["fsdp2"], flat["ddp"], what="trained weights")
