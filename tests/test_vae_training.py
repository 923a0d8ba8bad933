"""Autoencoder training (CPU, tiny): loss terms against their formulas, LPIPS loading, the loop, exact resume, export."""
import contextlib
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.errors import LdmError
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from ldm.train.autoencoder_loss import AutoencoderLoss, AutoencoderLossConfig, adaptive_weight
from ldm.train.checkpointing import checkpoint_dir, list_checkpoints, read_trainer_state
from ldm.train.discriminator import PatchDiscriminator, generator_adv_loss, hinge_d_loss, vanilla_d_loss
from ldm.train.vae_loop import (VAETrainConfig, estimate_scale_factor, load_autoencoder, measure_scale_factor, psnr,
                                train_autoencoder)

ROOT = Path(__file__).resolve().parents[1]
# 16 px images keep each step at tens of milliseconds on a shared 2-core machine.
FAST = ["progress=false", "log_with=none", "model.resolution=16", "data.resolution=16", "data.batches_per_epoch=3",
        "checkpoint_every=2", "checkpoints_total_limit=null", "scale_batches=2"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads make these tiny ops 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**kw) -> AutoencoderKL:
    return AutoencoderKL(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_groups=4, **kw))


# --- loss terms --------------------------------------------------------------------------------------------------

def test_adaptive_weight_equals_its_formula_on_a_toy_graph():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25], [1.5, -0.5]], requires_grad=True)
    x = torch.tensor([1.0, 2.0])
    c = torch.tensor([[0.1, 0.2], [0.3, -0.4], [0.0, 0.5]])
    nll = (w @ x).pow(2).sum()  # d/dW = 2 (W x) x^T
    g = (w * c).sum()  # d/dW = c
    expected = (2 * torch.outer(w @ x, x)).norm() / (c.norm() + 1e-4) * 0.5
    got = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert torch.allclose(got, expected.detach(), rtol=1e-6)
    assert not got.requires_grad
    tiny = (w * 1e-9).sum()  # ||grad g|| ~ 0: the ratio is clamped at 1e4
    assert float(adaptive_weight((w @ x).pow(2).sum(), tiny, w, disc_weight=1.0)) == pytest.approx(1e4)


def test_gan_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2] (mean 1)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1.0))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in [2.0, 0.5, -1.0]) / 3 + sum(softplus(f) for f in [-2.0, 0.0, 1.0]) / 3)
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(expected, rel=1e-6)
    assert float(generator_adv_loss(fake)) == pytest.approx(1 / 3)
    assert float(hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5))) == 0.0  # both margins met


def test_generator_loss_is_nll_plus_weighted_closed_form_kl():
    torch.manual_seed(1)
    b = 2
    x, rec = torch.rand(b, 3, 8, 8) * 2 - 1, torch.rand(b, 3, 8, 8) * 2 - 1
    mean, logvar = torch.randn(b, 4, 2, 2), torch.randn(b, 4, 2, 2) * 0.5
    posterior = DiagonalGaussian(torch.cat([mean, logvar], 1))
    config = AutoencoderLossConfig(kl_weight=1e-2, perceptual_weight=0.0, disc_start=10)
    objective = AutoencoderLoss(config)
    out_logvar = torch.tensor(0.3)
    loss, logs = objective.generator_loss(x, rec, posterior, out_logvar, step=0)
    std = torch.exp(0.5 * logvar)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0))
    kl = kl.sum() / b  # closed form 0.5 (mu^2 + s^2 - 1 - log s^2), summed over the latent, batch mean
    nll = ((x - rec).abs() / math.exp(0.3) + 0.3).sum() / b
    assert float(logs["kl_loss"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(logs["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(loss) == pytest.approx(float(nll + 1e-2 * kl), rel=1e-5)
    assert "g_loss" not in logs  # the GAN term is off before disc_start
    l2 = AutoencoderLoss(AutoencoderLossConfig(rec_loss="l2", perceptual_weight=0.0))
    _, logs2 = l2.generator_loss(x, rec, posterior, torch.tensor(0.0), step=0)
    assert float(logs2["nll_loss"]) == pytest.approx(float((x - rec).pow(2).sum() / b), rel=1e-5)


def test_one_step_of_each_optimizer_moves_only_its_own_network():
    torch.manual_seed(0)
    model = tiny_model()
    objective = AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=0.0, disc_start=0, disc_layers=2,
                                                      disc_channels=8))
    disc = objective.discriminator
    opt_ae = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ae0 = {k: v.clone() for k, v in model.state_dict().items()}
    d0 = {k: v.clone() for k, v in disc.named_parameters()}

    rec, posterior = model(x, generator=torch.Generator().manual_seed(0))
    loss, logs = objective.generator_loss(x, rec, posterior, torch.tensor(0.0), step=0,
                                          last_layer=model.decoder.conv_out.weight)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # the discriminator scores, it does not learn here
    assert 0.0 < float(logs["d_weight"]) <= 0.5 * 1e4 and math.isfinite(loss.item())
    opt_ae.step()
    moved = [k for k, p in model.named_parameters() if not torch.equal(p, ae0[k])]
    assert len(moved) == len(list(model.parameters()))  # every autoencoder tensor took a step
    assert all(torch.equal(p, d0[k]) for k, p in disc.named_parameters())

    d_loss, d_logs = objective.discriminator_loss(x, rec, step=0)
    ae1 = {k: v.clone() for k, v in model.state_dict().items()}
    opt_ae.zero_grad(set_to_none=True)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())  # reconstructions are detached
    opt_d.step()
    # every weight moved (the last bias has zero hinge gradient while all logits sit inside the margins: -1/2 + 1/2)
    assert all(not torch.equal(p, d0[k]) for k, p in disc.named_parameters() if k.endswith("weight"))
    assert all(torch.equal(v, ae1[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # a step on the same batch lowers the hinge loss
        after, _ = objective.discriminator_loss(x, rec, step=0)
    assert float(after) < d_loss.item()


def test_patch_discriminator_shape():
    d = PatchDiscriminator(3, channels=8, n_layers=3)
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # 70x70 receptive fields on a 64 px image


def test_psnr_known_values():
    x = torch.zeros(2, 3, 4, 4)
    assert psnr(x, x + 0.2).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # 0.1 on [0, 1] -> MSE 0.01
    y = x.clone()
    y[1] += 0.02  # 0.01 on [0, 1] -> 40 dB
    assert psnr(x, y).tolist() == pytest.approx([200.0, 40.0], abs=1e-3)  # identical images hit the 1e-20 floor


def test_scale_factor_is_one_over_std_of_the_latents():
    torch.manual_seed(3)
    batches = [torch.randn(4, 4, 8, 8) * 3 + 1, torch.randn(2, 4, 8, 8) * 5 - 2]
    expected = 1.0 / float(torch.cat([b.flatten() for b in batches]).double().std())
    assert estimate_scale_factor(batches) == pytest.approx(expected, rel=1e-10)
    assert estimate_scale_factor([torch.tensor([1.0, 3.0])]) == pytest.approx(1 / math.sqrt(2))


# --- LPIPS from local files -----------------------------------------------------------------------------------------

def test_lpips_absent_warns_or_raises(monkeypatch, tmp_path):
    from ldm.train.lpips import build_lpips

    monkeypatch.delenv("LDM_LPIPS_WEIGHTS", raising=False)
    with pytest.warns(UserWarning, match="LPIPS weights not given"):
        assert build_lpips(None, required=False) is None
    with pytest.raises(LdmError, match="lpips_required"):
        build_lpips(None, required=True)
    with pytest.raises(LdmError, match="lacks"):
        build_lpips(tmp_path)  # a folder without the files is an error even when not required
    with pytest.warns(UserWarning):
        assert AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=1.0)).lpips is None


def test_lpips_loads_local_files_and_matches_a_reference(monkeypatch, tmp_path):
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.models.vgg import cfgs, make_layers

    from ldm.train.lpips import LPIPS, build_lpips

    torch.manual_seed(0)
    vgg = torch.nn.Module()  # random weights stand in for ImageNet's, in torchvision's vgg16 file layout
    vgg.features = make_layers(cfgs["D"])
    vgg.eval()
    torch.save({**vgg.state_dict(), "classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "vgg16-397923af.pth")
    channels = (64, 128, 256, 512, 512)
    heads = [torch.rand(1, c, 1, 1) for c in channels]
    torch.save({f"lin{i}.model.1.weight": h for i, h in enumerate(heads)}, tmp_path / "vgg.pth")
    monkeypatch.setenv("LDM_LPIPS_WEIGHTS", str(tmp_path))
    net = build_lpips(None)
    assert isinstance(net, LPIPS) and not any(p.requires_grad for p in net.parameters())

    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    nodes = {str(i): f"relu{i}" for i in (3, 8, 15, 22, 29)}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    taps = create_feature_extractor(vgg.features, return_nodes=nodes)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    with torch.no_grad():
        fx, fy = taps((x - shift) / scale), taps((y - shift) / scale)
        expected = 0
        for head, name in zip(heads, nodes.values()):
            a = fx[name] / (fx[name].norm(dim=1, keepdim=True) + 1e-10)
            b = fy[name] / (fy[name].norm(dim=1, keepdim=True) + 1e-10)
            expected = expected + ((a - b) ** 2 * head).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        got = net(x, y)
    assert got.shape == (2, 1, 1, 1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert float(net(x, x).abs().max()) == 0.0
    y.requires_grad_(True)
    net(x, y).sum().backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0  # the perceptual loss reaches the reconstruction


# --- the loop --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ldm.data.synthetic import write_shape_shards

    root = tmp_path_factory.mktemp("vae-shapes")
    write_shape_shards(root / "train", 12, seed=0, image_size=16, samples_per_shard=6, image_format="png")
    write_shape_shards(root / "val", 4, seed=1, image_size=16, samples_per_shard=4, image_format="png")
    return str(root / "train"), str(root / "val")


def tiny_config(shards, out: Path, *overrides: str) -> VAETrainConfig:
    data = apply_overrides(load_yaml(ROOT / "configs" / "vae-tiny.yaml"), [*FAST, *overrides])
    data["data"]["shards"], data["validation"]["shards"] = shards
    data["output_dir"] = str(out)
    return from_dict(VAETrainConfig, data)


def initial_discriminator(config: VAETrainConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(config.seed)  # what train_autoencoder does: the autoencoder first, then the discriminator
    AutoencoderKL(config.model)
    return AutoencoderLoss(config.loss, in_channels=3).discriminator.state_dict()


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    """4 uninterrupted steps over an epoch boundary; the discriminator switches on at step 2."""
    out = tmp_path_factory.mktemp("vae-full")
    config = tiny_config(shards, out, "max_steps=4", "log_with=tensorboard")
    train_autoencoder(config)
    return out, config


def test_run_writes_checkpoints_logs_grid_and_final_model(full_run):
    out, config = full_run
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert read_trainer_state(checkpoint_dir(out, 4))["step"] == 4
    assert (out / "config.yaml").is_file() and load_yaml(out / "config.yaml")["model"]["resolution"] == 16
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "samples" / "reconstructions-000004.png").is_file()
    metrics = load_yaml(out / "metrics.json")  # JSON is YAML
    assert metrics["step"] == 4 and 0.0 < metrics["val/psnr"] < 100.0 and metrics["val/images"] == 4
    # the exported model: the trained weights, and a config whose scale_factor is the measured 1/std
    model = load_autoencoder(out)
    trained = load_file(str(checkpoint_dir(out, 4) / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[f"autoencoder.{k}"])
    assert model.config.scale_factor == pytest.approx(metrics["scale_factor"])
    assert model.config.scale_factor != 1.0
    again = measure_scale_factor(model, config, torch.device("cpu"), contextlib.nullcontext)
    assert again == pytest.approx(model.config.scale_factor, rel=1e-6)


def test_discriminator_frozen_before_disc_start_then_trained(full_run):
    out, config = full_run
    initial = initial_discriminator(config)
    at2 = load_file(str(checkpoint_dir(out, 2) / "model_1.safetensors"))  # steps 0, 1: before disc_start=2
    at4 = load_file(str(checkpoint_dir(out, 4) / "model_1.safetensors"))
    weights = [k for k in initial if k.endswith("weight")]
    assert all(torch.equal(initial[k], at2[k]) for k in initial)  # parameters and BatchNorm statistics untouched
    assert all(not torch.equal(initial[k], at4[k]) for k in weights)


def test_resume_continues_at_the_right_step_with_identical_weights(full_run, shards, tmp_path):
    full, _ = full_run
    first = tiny_config(shards, tmp_path, "max_steps=2")
    train_autoencoder(first)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    second = tiny_config(shards, tmp_path, "max_steps=4")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_autoencoder(second, resume="latest")
    assert not [w for w in record if "data stream" in str(w.message)]  # the same stream: nothing to say
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert read_trainer_state(checkpoint_dir(tmp_path, 4))["stream"]["seed"] == 0  # what the position counts in
    for name in ("model.safetensors", "model_1.safetensors"):  # autoencoder and discriminator at step 4
        a, b = load_file(str(checkpoint_dir(full, 4) / name)), load_file(str(checkpoint_dir(tmp_path, 4) / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert load_yaml(tmp_path / "metrics.json")["scale_factor"] == load_yaml(full / "metrics.json")["scale_factor"]
    # resumed with another data stream (as the diffusion trainer): a warning naming what changed
    with pytest.warns(UserWarning, match=r"data stream differs from the checkpoint's \(data.seed 0 -> 7\)"):
        train_autoencoder(tiny_config(shards, tmp_path, "max_steps=4", "data.seed=7"), resume="latest")


def test_a_full_disk_at_the_export_says_how_to_export_again_and_that_works(shards, tmp_path, monkeypatch):
    """The diffusion trainer's hint, here too (it was the generic one-line error): the last step is checkpointed
    before the export, so `--resume latest` trains nothing and exports."""
    from safetensors import SafetensorError

    from ldm.errors import LdmError
    from ldm.train import vae_loop

    real = vae_loop.export_autoencoder

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(vae_loop, "export_autoencoder", full_disk)
    with pytest.raises(LdmError, match=r"cannot write the exported model .*no space left on device.*--resume latest"):
        train_autoencoder(tiny_config(shards, tmp_path, "max_steps=1"))
    monkeypatch.setattr(vae_loop, "export_autoencoder", real)
    with pytest.warns(UserWarning, match="nothing is trained"):
        train_autoencoder(tiny_config(shards, tmp_path, "max_steps=1"), resume="latest")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / "autoencoder.safetensors").is_file()


# --- configs and the command line ------------------------------------------------------------------------------

def test_shipped_configs_parse_and_sd_has_the_sd_architecture():
    for name in ("vae-tiny", "vae-emoji", "vae-sd"):
        config = from_dict(VAETrainConfig, load_yaml(ROOT / "configs" / f"{name}.yaml"))
        assert config.model.resolution == config.data.resolution
    sd = from_dict(VAETrainConfig, load_yaml(ROOT / "configs" / "vae-sd.yaml"))
    assert (sd.model.ch, sd.model.ch_mult, sd.model.z_channels) == (128, (1, 2, 4, 4), 4)
    assert (sd.loss.disc_start, sd.loss.kl_weight, sd.loss.disc_weight) == (50001, 1e-6, 0.5)
    with torch.device("meta"):
        model = AutoencoderKL(sd.model)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # the released SD-1 VAE's parameter count


def test_cli_rejects_unknown_keys(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import train_vae

    code = train_vae.main(["--config", str(ROOT / "configs" / "vae-tiny.yaml"), "loss.kl_wieght=1"])
    assert code == 2 and "kl_wieght" in capsys.readouterr().err
