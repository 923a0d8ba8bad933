"""DeepFloyd IF's U-Net (ldm.models.if_unet) against diffusers' UNet2DConditionModel on the same random weights."""
import pytest
import torch
from helpers import SEED, assert_close_to_ref
from if_helpers import diffusers_if_unet

from ldm.diffusion.noise_augmentation import if_noise_level_from_level, level_from_if_noise_level
from ldm.errors import CheckpointError, ConfigError
from ldm.io.keys_if import (if_config_from_diffusers, if_config_to_diffusers, if_unet_diffusers_to_native,
                            if_unet_native_to_diffusers)
from ldm.models.if_unet import IFUNet


def _ours(ref):
    config = if_config_from_diffusers(dict(ref.config), learn_sigma=True)
    net = IFUNet(config).eval()
    net.load_state_dict(if_unet_diffusers_to_native(ref.state_dict(), config))
    return net


@pytest.mark.parametrize("super_resolution", [False, True], ids=["IF-I", "IF-II"])
@pytest.mark.parametrize("seed", [0, 1])
def test_if_unet_matches_diffusers(super_resolution, seed):
    """Outputs equal diffusers' within 1e-5 of their magnitude (fp32): eps and variance halves, T5-width context."""
    ref = diffusers_if_unet(super_resolution, seed)
    net = _ours(ref)
    g = torch.Generator().manual_seed(SEED + seed)
    x = torch.randn(2, ref.config.in_channels, 16, 16, generator=g)
    t = torch.tensor([3.0, 871.0])
    context = torch.randn(2, 9, 32, generator=g)
    kwargs, level = {}, None
    if super_resolution:
        noise_level = torch.tensor([250, 20])
        kwargs["class_labels"] = noise_level
        level = level_from_if_noise_level(noise_level).float()  # ldm's level of IF's noise_level, in float32
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, **kwargs).sample
        got = net(x, t, context, aug_level=level)
    assert got.shape == (2, 6, 16, 16)
    assert expected.abs().max() > 0.3  # a non-trivial output (the zero-initialised last conv is redrawn)
    assert_close_to_ref(got, expected, what="IF U-Net output")
    # other text moves the output far more than the tolerance: the attention and the pooled embedding are live
    with torch.no_grad():
        other = net(x, t, torch.randn(context.shape, generator=g), aug_level=level)
    assert (other - got).abs().max() > 1e-2 * expected.abs().max()


def test_noise_level_round_trip_is_exact_at_integers():
    """IF-II's noise_level -> ldm's level (float32) -> noise_level gives the integer back, as its embedding saw it."""
    levels = torch.tensor([0, 20, 100, 250, 500, 999])
    back = if_noise_level_from_level(level_from_if_noise_level(levels).float())
    assert torch.equal(back, levels.double())
    middle = if_noise_level_from_level((level_from_if_noise_level(250) + level_from_if_noise_level(251)) / 2)
    assert 250.4 < float(middle) < 250.6  # linear between integers


def test_key_and_config_round_trip_is_exact():
    """diffusers -> native -> diffusers gives every tensor back (the same key set), and the config back."""
    for sr in (False, True):
        ref = diffusers_if_unet(sr)
        config = if_config_from_diffusers(dict(ref.config), learn_sigma=True)
        sd = ref.state_dict()
        back = if_unet_native_to_diffusers(if_unet_diffusers_to_native(sd, config), config)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        again = if_config_from_diffusers(if_config_to_diffusers(config), learn_sigma=True)
        assert again == config


def test_unplaceable_keys_are_named():
    ref = diffusers_if_unet()
    config = if_config_from_diffusers(dict(ref.config), learn_sigma=True)
    sd = {**ref.state_dict(), "mystery.block.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="mystery.block.weight"):
        if_unet_diffusers_to_native(sd, config)


def test_unsupported_config_is_refused():
    ref = diffusers_if_unet()
    with pytest.raises(ConfigError, match="class_embed_type"):
        if_config_from_diffusers({**ref.config, "class_embed_type": "projection"}, learn_sigma=True)
    with pytest.raises(ConfigError, match="mid_block_type"):
        if_config_from_diffusers({**ref.config, "mid_block_type": "UNetMidBlock2DCrossAttn"}, learn_sigma=True)
