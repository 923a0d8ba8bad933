"""The training loop on the tiny config (CPU, seconds): a run, exact resume, gradient accumulation, the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST_TRAINING, tiny_train_config, write_bad_shard
from safetensors.torch import load_file

from ldm.config import from_dict, load_yaml
from ldm.data.synthetic import generate_shapes
from ldm.errors import LdmError
from ldm.eval.features import compute_features
from ldm.eval.frechet import save_stats
from ldm.train.checkpointing import list_checkpoints, read_trainer_state
from ldm.train.config import TrainConfig
from ldm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def full_run(shape_shards, tmp_path_factory):
    """3 uninterrupted steps (over an epoch boundary: 2 batches per epoch), with the end-of-run samples and logs."""
    out = tmp_path_factory.mktemp("full")
    config = tiny_train_config(shape_shards, out, "max_steps=3", "sampling.at_end=true", "sampling.steps=2",
                               "log_with=tensorboard")
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in _initial_unet(config).items()}
    train(config)
    return out, initial


def _initial_unet(config: TrainConfig) -> dict[str, torch.Tensor]:
    from ldm.train.model import build_parts

    torch.manual_seed(config.seed)  # what train() does before building
    return build_parts(config.model).unet.state_dict()


def test_run_writes_checkpoints_config_samples_and_logs(full_run):
    out, initial = full_run
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    state = read_trainer_state(out / "checkpoints" / "step-000003")
    assert state["step"] == 3 and state["epoch"] == 1 and state["batch_in_epoch"] == 1 and state["samples"] == 6
    trained = weights(out / "checkpoints" / "step-000003" / "model.safetensors")
    unet = {k[len("denoiser.network."):]: v for k, v in trained.items() if k.startswith("denoiser.network.")}
    assert set(unet) == set(initial)
    assert any(k.startswith("text_encoder.") for k in trained)  # the small text encoder trains with the U-Net
    changed = max((unet[k] - initial[k]).abs().max().item() for k in unet)
    assert 1e-5 < changed < 1.0 and all(torch.isfinite(v).all() for v in unet.values())
    # the zero-initialised output convolution moved away from zero: gradients reached the end of the network
    assert unet["out.2.weight"].abs().max() > 0
    ema = weights(out / "checkpoints" / "step-000003" / "ema.safetensors")
    assert int(ema["num_updates"]) == 3
    assert not torch.equal(ema["shadow.denoiser.network.out.2.weight"], unet["out.2.weight"])  # averaged, not copied
    saved = load_yaml(out / "train_config.yaml")  # DIR/config.yaml belongs to the exported native model
    assert saved["max_steps"] == 3 and saved["model"]["unet"]["num_res_blocks"] == 1
    assert saved["model"]["unet"]["dropout"] == 0.0  # defaults written out (the resolved config)
    assert from_dict(TrainConfig, saved).model.autoencoder["norm_groups"] == 8
    assert len(list((out / "samples").glob("samples-000003.png"))) == 1
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_final_model_is_the_ema_in_native_format(full_run):
    from ldm.io.formats import load_model
    from ldm.pipeline.load import load_pipeline

    out, _ = full_run
    components = load_model(out)
    ema = weights(out / "checkpoints" / "step-000003" / "ema.safetensors")
    for name, value in components.unet.state_dict().items():
        torch.testing.assert_close(value, ema[f"shadow.denoiser.network.{name}"], rtol=0, atol=0)
    for name, value in components.text_encoder.state_dict().items():
        if f"shadow.text_encoder.{name}" in ema:
            torch.testing.assert_close(value, ema[f"shadow.text_encoder.{name}"], rtol=0, atol=0)
    assert components.autoencoder.config.norm_groups == 8 and components.schedule.prediction_type == "epsilon"
    images = load_pipeline(out, device="cpu")("a red circle", steps=2, height=32, width=32, guidance=2.0, seed=1)
    assert images[0].size == (32, 32)


def test_resume_continues_exactly(full_run, shape_shards, tmp_path, capsys):
    out, _ = full_run
    config = tiny_train_config(shape_shards, tmp_path, "max_steps=2")
    train(config)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    first = (tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").stat().st_mtime_ns
    capsys.readouterr()
    train(tiny_train_config(shape_shards, tmp_path, "max_steps=3"), resume="latest")
    assert "at step 2" in capsys.readouterr().out  # it resumed (a fresh run would rewrite step 2)
    assert (tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").stat().st_mtime_ns == first
    for name in ("model.safetensors", "ema.safetensors"):
        a = weights(out / "checkpoints" / "step-000003" / name)
        b = weights(tmp_path / "checkpoints" / "step-000003" / name)
        assert a.keys() == b.keys()
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-6, f"{name} differs by {worst} after resume"
    opt_a = torch.load(out / "checkpoints" / "step-000003" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(tmp_path / "checkpoints" / "step-000003" / "optimizer.bin", weights_only=True)
    for key in opt_a["state"]:
        torch.testing.assert_close(opt_a["state"][key]["exp_avg_sq"], opt_b["state"][key]["exp_avg_sq"],
                                   rtol=0, atol=1e-9)
    step = "checkpoints/step-000003"
    assert read_trainer_state(tmp_path / step) == read_trainer_state(out / step)


def test_gradient_accumulation_equals_large_batch(shape_shards, tmp_path):
    # AdamW's first step with eps >> |g| is lr * g / eps: the parameter change *is* the gradient (lr = eps).
    common = ["max_steps=1", "optim.lr=1000.0", "optim.eps=1000.0", "optim.warmup_steps=0", "optim.max_grad_norm=null",
              "data.caption_dropout=0.0"]
    train(tiny_train_config(shape_shards, tmp_path / "big", *common, "data.batch_size=2", "grad_accum=1"))
    train(tiny_train_config(shape_shards, tmp_path / "accum", *common, "data.batch_size=1", "grad_accum=2"))
    initial = _initial_unet(tiny_train_config(shape_shards, tmp_path / "x"))
    big = weights(tmp_path / "big" / "checkpoints" / "step-000001" / "model.safetensors")
    accum = weights(tmp_path / "accum" / "checkpoints" / "step-000001" / "model.safetensors")
    grads = {k: big[k] - initial[k[len("denoiser.network."):]] for k in big if k.startswith("denoiser.network.")}
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4  # the step really moved the weights
    worst = max((big[k] - accum[k]).abs().max().item() for k in big)
    assert worst < 1e-5, f"accumulated step differs from the large-batch step by {worst}"


def test_latent_inputs_without_latent_fields_is_a_clear_error(shape_shards, tmp_path):
    with pytest.raises(LdmError, match="needs latent shards"):
        train(tiny_train_config(shape_shards, tmp_path, "max_steps=1", "loss.inputs=latents"))


def test_cli_rejects_unknown_keys_with_exit_code_2(shape_shards, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import train as train_cli
    finally:
        sys.path.pop(0)
    code = train_cli.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--train-data", shape_shards,
                           "--output-dir", str(tmp_path), "optim.learning_rate=1e-3"])
    assert code == 2 and "learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("LDM_SKIP_DDP")), reason="LDM_SKIP_DDP is set (2 CPU processes, ~30 s)")
def test_ddp_on_two_cpu_processes_resumes_exactly(shape_shards, tmp_path):
    def run(out, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "tools" / "train.py"),
               "--config", str(ROOT / "configs" / "tiny.yaml"), "--train-data", shape_shards,
               "--output-dir", str(out),
               *FAST_TRAINING, "data.num_workers=1", *args]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)

    run(tmp_path / "full", "max_steps=3")
    run(tmp_path / "part", "max_steps=2")
    run(tmp_path / "part", "max_steps=3", "--resume", "latest")
    step = tmp_path / "full" / "checkpoints" / "step-000003"
    assert {p.name for p in step.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(step / name), weights(tmp_path / "part" / "checkpoints" / "step-000003" / name)
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def _latent_sample(raw, config, rng):
    """A stand-in for precomputed latent shards: a fixed function of the key as (mean, std) and text tokens."""
    from ldm.data.samples import read_caption

    g = torch.Generator().manual_seed(int(raw["__key__"]))
    return 0, {"latent_mean": torch.randn(4, 8, 8, generator=g), "latent_std": torch.full((4, 8, 8), 0.1),
               "text_tokens": torch.randn(48, 32, generator=g), "caption": read_caption(raw, "txt"),
               "key": raw["__key__"]}


def test_latent_shards_train_with_dropped_captions_swapped_for_the_empty_prompt(shape_shards, tmp_path):
    from ldm.data.samples import register_sample_format
    from ldm.train.loop import latent_text_conditioning
    from ldm.train.model import build_parts

    register_sample_format("test_latent", _latent_sample)
    out = train(tiny_train_config(shape_shards, tmp_path, "max_steps=2", "loss.inputs=latents",
                                  "data.sample_format=test_latent",
                            "model.text_encoder.freeze=true", "data.caption_dropout=0.5"))
    assert [s for s, _ in list_checkpoints(out)] == [2]
    parts = build_parts(tiny_train_config(shape_shards, tmp_path / "x", "model.text_encoder.freeze=true").model)
    tokens = torch.randn(3, 48, 32)
    batch = {"text_tokens": tokens, "drop_mask": torch.tensor([False, True, False])}
    got = latent_text_conditioning(batch, parts, "cpu")["context"]
    empty = parts.text_encoder.encode([""]).tokens[0]
    assert torch.equal(got[0], tokens[0]) and torch.equal(got[2], tokens[2]) and torch.equal(got[1], empty)


def test_learned_variance_unet_trains_with_the_hybrid_loss(shape_shards, tmp_path):
    out = train(tiny_train_config(shape_shards, tmp_path, "max_steps=1", "model.unet.learn_sigma=true"))
    trained = weights(out / "checkpoints" / "step-000001" / "model.safetensors")
    out_conv = trained["denoiser.network.out.2.weight"]
    assert out_conv.shape[0] == 8  # eps and the variance interpolation
    assert out_conv[4:].abs().max() > 0  # the variance half got gradients (from L_vlb only)


def test_training_on_corrupt_shards_skips_and_reports_them(tmp_path):
    """A truncated JPEG, garbage bytes named .jpg and a caption-less sample: training goes on and counts them."""
    folder = write_bad_shard(tmp_path / "bad", good=5)
    out = train(tiny_train_config(str(folder), tmp_path / "run", "max_steps=3", "data.batch_size=2",
                                  "data.shuffle_buffer=0"))
    state = read_trainer_state(out / "checkpoints" / "step-000003")
    assert state["step"] == 3
    # each pass over the shard meets the truncated and the garbage JPEG before its first good sample
    assert state["skipped"] >= 2


@pytest.mark.slow
def test_evaluation_inside_training_logs_clip_score_fd_and_grid(shape_shards, tiny_clip_config, tiny_clip, tmp_path,
                                                                 capsys):
    """sampling.eval_prompts: the prompt set is generated at each grid, scored with CLIP, compared with ref stats."""
    clip_cfg, clip = tiny_clip_config, tiny_clip
    refs = [s.image for s in generate_shapes(8, seed=5, image_size=32)]
    ref_path = tmp_path / "ref.npz"
    save_stats(ref_path, compute_features(refs, clip, progress=False).moments.to_stats(clip.name))
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = train(tiny_train_config(shape_shards, tmp_path / "run", "max_steps=2", "sampling.at_end=true",
                                  "sampling.steps=2", f"sampling.eval_prompts={prompts}",
                                  f"sampling.clip_model={clip_cfg}", "sampling.clip_pretrained=none",
                                  f"sampling.ref_stats={ref_path}"))
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if " eval " in line)
    values = dict(zip(line.split()[3::2], map(float, line.split()[4::2])))
    assert 0.0 <= values["clip_score"] <= 100.0 and values["fd_clip"] > 0.0
    assert (out / "samples" / "eval-000002.png").is_file()
