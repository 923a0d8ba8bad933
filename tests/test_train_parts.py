"""Training building blocks with known answers: EMA closed forms, the LR schedule, atomic and rotated checkpoints."""
import json
import math

import pytest
import torch
from torch import nn

from ldm.errors import CheckpointError, ConfigError
from ldm.train import checkpointing as ckpt
from ldm.train.config import OptimConfig, TrainConfig
from ldm.train.ema import EMA, ema_decay
from ldm.train.optim import lr_at


def _params_sequence(k: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=g) for _ in range(k)]


def test_ema_constant_decay_closed_form():
    # shadow_k = d^k theta_0 + sum_i (1 - d) d^(k - i) theta_i
    model = nn.Linear(2, 3, bias=False)
    theta0 = model.weight.detach().clone()
    d, k = 0.9, 7
    ema = EMA(model, decay=d)
    thetas = _params_sequence(k)
    for theta in thetas:
        model.weight.data.copy_(theta)
        ema.update(model)
    expected = d**k * theta0 + sum((1 - d) * d ** (k - i) * thetas[i - 1] for i in range(1, k + 1))
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=0, atol=1e-6)
    assert ema.num_updates == k


def test_ema_warmup_decay_closed_form():
    # decay_n = min(d, 1 - (1 + n / inv_gamma)^-power)
    # shadow_k = prod_j d_j theta_0 + sum_i (1 - d_i) prod_{j>i} d_j theta_i
    model = nn.Linear(2, 3, bias=False)
    theta0 = model.weight.detach().clone()
    d, k, inv_gamma, power = 0.75, 8, 1.0, 0.75
    decays = [min(d, 1 - (1 + n / inv_gamma) ** -power) for n in range(k)]
    assert decays[0] == 0.0 and decays[1] == pytest.approx(1 - 2**-0.75) and decays[-1] == d
    ema = EMA(model, decay=d, warmup=True, inv_gamma=inv_gamma, power=power)
    thetas = _params_sequence(k, seed=2)
    for theta in thetas:
        model.weight.data.copy_(theta)
        ema.update(model)
    expected = math.prod(decays) * theta0
    for i, theta in enumerate(thetas):
        expected = expected + (1 - decays[i]) * math.prod(decays[i + 1:]) * theta
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=0, atol=1e-6)
    assert ema_decay(10**9, d, warmup=True) == d


def test_ema_swap_state_dict_and_frozen_params():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert ema.names == ["0.weight", "0.bias"]  # only trained parameters are averaged
    trained = model[0].weight.detach().clone()
    ema.shadow["0.weight"].fill_(3.0)
    with ema.swapped_in(model):
        assert torch.all(model[0].weight == 3.0)
    torch.testing.assert_close(model[0].weight, trained, rtol=0, atol=0)
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.all(other.shadow["0.weight"] == 3.0) and other.num_updates == 0
    with pytest.raises(KeyError):
        EMA(nn.Linear(3, 3), decay=0.5).load_state_dict(ema.state_dict())


def test_lr_schedules():
    warm = OptimConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, warm, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, warm, 104) == pytest.approx(1.0)
    assert lr_at(54, warm, 104) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_at(104, warm, 104) == pytest.approx(0.1) and lr_at(500, warm, 104) == pytest.approx(0.1)
    linear = OptimConfig(lr=2.0, lr_schedule="linear", decay_steps=10)
    assert lr_at(5, linear, 1000) == pytest.approx(1.0) and lr_at(10, linear, 1000) == pytest.approx(0.0)
    assert lr_at(123, OptimConfig(lr=3.0), 10) == 3.0
    with pytest.raises(ConfigError):
        OptimConfig(lr_schedule="step")


def test_train_config_rejects_unknown_keys():
    from ldm.config import from_dict

    with pytest.raises(ConfigError, match="lr_shedule"):
        from_dict(TrainConfig, {"optim": {"lr_shedule": "cosine"}})
    with pytest.raises(ConfigError, match="mixed_precision"):
        from_dict(TrainConfig, {"mixed_precision": "fp8"})
    cfg = from_dict(TrainConfig, {"data": {"batch_size": 3}, "optim": {"betas": [0.9, 0.99]}})
    assert cfg.data.batch_size == 3 and cfg.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize("override, message", [
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be > 0"),  # silently flipped every gradient's sign
    ("optim.max_grad_norm=0", "optim.max_grad_norm must be > 0"),  # silently zeroed every gradient
    ("optim.betas=[2,0.9]", "optim.betas must be two numbers"),  # was torch's ValueError after the model was built
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("optim.weight_decay=-1", "optim.eps and optim.weight_decay"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must lie in"),
    ("optim.decay_steps=0", "optim.decay_steps"),  # 0 was taken for null
    ("ema.inv_gamma=0", "ema.inv_gamma and ema.power"),  # was a ZeroDivisionError at the first step
    ("sampling.sampler=bogus", "unknown sampler 'bogus'"),  # these three failed only at the end of the run,
    ("sampling.steps=0", "sampling.steps"),  # after every training step, and before the export
    ("sampling.n_per_prompt=0", "n_per_prompt"),
    ("sampling.every=-1", "sampling.every must be >= 0"),
    ("sampling.guidance=-3", "sampling.guidance"),
    ("attention_backend=bogus", "attention_backend must be one of"),  # was a ValueError traceback
    ("loss.min_snr_gamma=0", "loss.min_snr_gamma must be > 0"),
    ("data.resolution=0", "resolution"),
    ("data.background=[300,0,0]", "background"),
])
def test_train_config_refuses_values_out_of_range_naming_the_key(override, message):
    from ldm.config import apply_overrides, from_dict

    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, apply_overrides({}, [override]))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)


@pytest.fixture()
def accel_setup():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    optimizer.step()
    return accelerator, model, optimizer


def test_checkpoint_roundtrip_rotation_and_latest(tmp_path, accel_setup):
    accelerator, model, optimizer = accel_setup
    ema = EMA(model, decay=0.5)
    for step in (2, 4, 6):
        ckpt.save_checkpoint(accelerator, tmp_path, step, {"epoch": 0, "samples": step * 10}, ema, total_limit=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]  # step 2 rotated away
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    latest = ckpt.resolve_resume(tmp_path, "latest")
    assert latest.name == "step-000006"
    saved_weight = model.lin.weight.detach().clone()
    saved_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    ema.shadow["lin.weight"].zero_()
    state = ckpt.load_checkpoint(accelerator, latest, ema)
    assert state == {"epoch": 0, "samples": 60, "step": 6}
    torch.testing.assert_close(model.lin.weight, saved_weight, rtol=0, atol=0)
    torch.testing.assert_close(optimizer.state_dict()["state"][0]["exp_avg"], saved_moment, rtol=0, atol=0)
    torch.testing.assert_close(ema.shadow["lin.weight"], saved_weight, rtol=0, atol=0)
    assert ckpt.resolve_resume(tmp_path / "elsewhere", "latest") is None  # fresh start
    with pytest.raises(CheckpointError):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_crash_mid_save_leaves_no_half_checkpoint(tmp_path, accel_setup, monkeypatch):
    accelerator, model, _ = accel_setup
    ema = EMA(model, decay=0.5)
    ckpt.save_checkpoint(accelerator, tmp_path, 2, {"epoch": 0}, ema)

    def broken_writer(*args, **kwargs):  # the EMA file is written after accelerate's files: a crash in between
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_writer)
    with pytest.raises(CheckpointError, match="step 4 .*disk full.*--resume latest"):  # an error line, not a traceback
        ckpt.save_checkpoint(accelerator, tmp_path, 4, {"epoch": 0}, ema)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]  # no step-4, no temp dir
    assert ckpt.resolve_resume(tmp_path, "latest").name == "step-000002"
    # a folder that a killed process left without its state file is never taken for a checkpoint
    (tmp_path / "checkpoints" / "step-000008").mkdir()
    (tmp_path / "checkpoints" / "step-000008" / "model.safetensors").write_bytes(b"half")
    assert ckpt.resolve_resume(tmp_path, "latest").name == "step-000002"
    assert json.loads((tmp_path / "checkpoints" / "step-000002" / ckpt.STATE_FILE).read_text())["step"] == 2


@pytest.mark.parametrize("error", [
    "safetensors",  # what safetensors raises when the disk fills (not an OSError)
    "torch.save",  # what torch.save's zip writer raises for the optimizer file on a full disk
])
def test_a_real_full_disk_while_saving_is_an_error_line_not_a_traceback(error, tmp_path, accel_setup, monkeypatch):
    from safetensors import SafetensorError

    accelerator, model, _ = accel_setup
    ema = EMA(model, decay=0.5)
    raised = {"safetensors": SafetensorError("Error while serializing: I/O error: No space left on device "
                                             "(os error 28)"),
              "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2097472 vs "
                                         "2097364")}[error]

    def full_disk(*args, **kwargs):
        raise raised

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"step 4 .*(no space left on device|written short).*--resume latest"):
        ckpt.save_checkpoint(accelerator, tmp_path, 4, {"epoch": 0}, ema)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the temporary folder is gone


def test_a_full_disk_during_the_export_names_the_way_out_and_leaves_no_staging(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from ldm.errors import LdmError
    from ldm.io import native_format
    from ldm.models.text_encoders import TextEncoderConfig
    from ldm.train.loop import export_model
    from ldm.train.model import build_parts
    from ldm.train.config import ModelConfig

    parts = build_parts(ModelConfig(
        unet=dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=[1], num_res_blocks=1,
                  attention_resolutions=[], context_dim=16, num_heads=1),
        autoencoder=None, text_encoder=vars(TextEncoderConfig(type="small", max_length=8,
                                                              small={"width": 16, "layers": 1, "heads": 1}))))

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(native_format, "write_safetensors", full_disk)
    with pytest.raises(LdmError, match=r"cannot write the exported model .*no space left on device.*--resume latest"):
        export_model(parts, None, None, tmp_path, step=3)
    assert list(tmp_path.iterdir()) == []  # no hidden .export.tmp left behind


def test_parameter_fingerprint_sees_any_single_change():
    import torch

    from ldm.train.loop import parameter_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = parameter_fingerprint(model)
    assert torch.equal(before, parameter_fingerprint(model))
    with torch.no_grad():
        w = model[1].weight
        w[0, 0], w[0, 1] = w[0, 1].item(), w[0, 0].item()  # a swap keeps the plain sum: the weighted sum catches it
    after = parameter_fingerprint(model)
    assert after[0].item() == pytest.approx(before[0].item()) and after[1] != before[1]
