from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.config import from_dict, load_yaml
from ldm.data.config import DataConfig
from ldm.diffusion.noise_augmentation import StageConfig, sample_aug_levels, training_conditioning_image
from ldm.diffusion.schedules import DiscreteSchedule, ScheduleConfig
from ldm.models.efficient_unet import EfficientUNet, EfficientUNetConfig, count_parameters
from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder
from ldm.train.config import EMAConfig, OptimConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# config -> (parameters in the paper, Saharia et al. 2022 Sec. 4.1 / App. B)
PAPER_SIZED = {"imagen-base-64.yaml": 2.0e9, "imagen-sr-256.yaml": 600e6, "imagen-sr-1024.yaml": 400e6}
TINY = ("imagen-tiny-base.yaml", "imagen-tiny-sr.yaml")


def _sections(name: str):
    """The network, text encoder, schedule and stage configs of a YAML file (every other section checked too)."""
    raw = load_yaml(CONFIGS / name)
    model = dict(raw["model"])
    unet = dict(model["unet"])
    assert unet.pop("type") == "efficient_unet"  # the parts registry keys on `type`
    for key, cls in (("data", DataConfig), ("optim", OptimConfig), ("ema", EMAConfig)):
        from_dict(cls, raw.get(key), where=f"{name}:{key}")
    return (from_dict(EfficientUNetConfig, unet, where=f"{name}:model.unet"),
            from_dict(TextEncoderConfig, model["text_encoder"]), from_dict(ScheduleConfig, model["schedule"]),
            from_dict(StageConfig, model["stage"]), raw)


@pytest.mark.parametrize("name", sorted(PAPER_SIZED))
def test_paper_sized_configs_build_at_the_papers_size(name):
    net, text, _, stage, raw = _sections(name)
    n = count_parameters(net)
    assert PAPER_SIZED[name] / 2 <= n <= PAPER_SIZED[name] * 1.5, f"{name}: {n / 1e6:.0f}M parameters"
    assert net.context_dim == 4096 and text.type == "t5" and text.max_length == 128
    assert net.sample_size == stage.resolution == raw["data"]["resolution"]
    assert stage.dynamic_threshold is not None
    is_sr = stage.low_res_size is not None
    assert net.aug_level_conditioning == is_sr and net.in_channels == (6 if is_sr else 3)
    assert stage.resolution % net.downsample_factor == 0


def test_sr_1024_stage_has_no_self_attention_and_trains_on_crops():
    net, _, _, stage, _ = _sections("imagen-sr-1024.yaml")
    assert net.attention_levels == () and net.cross_attention_levels
    assert (stage.low_res_size, stage.resolution, stage.train_crop_size) == (256, 1024, 256)
    assert stage.train_crop_size % net.downsample_factor == 0  # crops and full size both run convolutionally
    sr256, _, _, _, _ = _sections("imagen-sr-256.yaml")
    assert sr256.attention_levels == (3,)


@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_build_and_run(name):
    net_config, text_config, _, stage, _ = _sections(name)
    net = EfficientUNet(net_config)
    assert sum(p.numel() for p in net.parameters()) < 3e6
    text = build_text_encoder(text_config)
    emb = text.encode(["a red circle", ""])
    x = torch.randn(2, net_config.in_channels, stage.resolution, stage.resolution)
    aug = {"aug_level": 0.25} if net_config.aug_level_conditioning else {}
    with torch.no_grad():
        out = net(x, torch.tensor([10.0, 500.0]), emb.tokens, emb.mask, **aug)
    assert out.shape == (2, 3, stage.resolution, stage.resolution)


def _tiny_sr_batch(stage, schedule_config, batch=4):
    """x_t, the augmented conditioning image, timesteps, eps and levels for a batch of smooth 32 px images."""
    g = torch.Generator().manual_seed(0)
    alphas_cumprod = DiscreteSchedule.from_config(schedule_config).alphas_cumprod
    size = stage.resolution
    # smooth images in [-1, 1]: the low-res image carries most of the signal, as with real photographs
    images = F.interpolate(torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear")
    levels = sample_aug_levels(batch, stage.train_aug_level_max, generator=g)
    low_res = training_conditioning_image(images, stage.low_res_size, levels, torch.randn(images.shape, generator=g))
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    eps = torch.randn(images.shape, generator=g)
    a = alphas_cumprod[timesteps].sqrt()[:, None, None, None]
    s = (1 - alphas_cumprod[timesteps]).sqrt()[:, None, None, None]
    return a * images + s * eps, low_res, timesteps.float(), eps, levels


def _tiny_sr_trainer():
    net_config, text_config, schedule_config, stage, _ = _sections("imagen-tiny-sr.yaml")
    torch.manual_seed(0)
    net = EfficientUNet(net_config).train()
    text = build_text_encoder(text_config)
    params = list(net.parameters()) + [p for p in text.parameters() if p.requires_grad]
    x_t, low_res, timesteps, eps, levels = _tiny_sr_batch(stage, schedule_config)
    prompts = ["a red circle", "a blue square", "", "a green triangle"]

    def loss_fn():
        emb = text.encode(prompts)
        pred = net(torch.cat([x_t, low_res], dim=1), timesteps, emb.tokens, emb.mask, aug_level=levels)
        return (pred - eps).square().mean()

    return net, params, loss_fn


def test_tiny_sr_training_step_on_cpu():
    net, params, loss_fn = _tiny_sr_trainer()
    loss = loss_fn()
    assert abs(loss.item() - 1.0) < 0.1  # zero-initialised output: the first loss is E[eps^2] = 1
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert net.out[-1].weight.grad.abs().max() > 0  # the zero-initialised output conv is what learns first


@pytest.mark.slow
def test_tiny_sr_loss_decreases_and_the_level_gets_gradients():
    net, params, loss_fn = _tiny_sr_trainer()
    optimizer = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(4):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert net.aug_level_embed[0].weight.grad.abs().max() > 0  # the level reaches the loss
    assert losses[-1] < 0.95 * losses[0]  # measured: 1.022 -> 0.928 on the same batch
