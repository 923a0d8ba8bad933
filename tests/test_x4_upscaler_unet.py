"""The SD x4 upscaler's U-Net (7 input channels, noise level as class label, cross-attention only where CompVis'
`disable_self_attentions` says) equals diffusers' UNet2DConditionModel with `only_cross_attention`."""
import pytest
import torch
from helpers import assert_close_to_ref, realistic_weights
from upscaler_helpers import TINY_X4_UNET, TINY_X4_UNET_DIFFUSERS, X4_ORIGINAL_UNET

from ldm.errors import ConfigError
from ldm.io.keys_unet import (unet_config_from_diffusers, unet_config_to_diffusers, unet_diffusers_to_original,
                              unet_original_to_diffusers)
from ldm.io.part_types import unet_config
from ldm.models.unet import UNetConfig, UNetModel

diffusers = pytest.importorskip("diffusers")


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 16, 16, generator=g)
    context = torch.randn(2, 5, 32, generator=g)
    return x, torch.tensor([3.0, 640.0]), context, torch.tensor([20, 77])


def test_the_tiny_config_reads_from_diffusers_and_back():
    reference = diffusers.UNet2DConditionModel(**TINY_X4_UNET_DIFFUSERS).config
    ours = unet_config_from_diffusers(dict(reference))
    assert ours == TINY_X4_UNET
    assert unet_config_from_diffusers(unet_config_to_diffusers(ours)) == ours


def test_attn1_attends_to_the_text_where_self_attention_is_disabled():
    unet = UNetModel(TINY_X4_UNET)
    sd = unet.state_dict()
    # levels 1 and 2 (ds 2 and 4): level 1 has no self-attention, level 2 has; attn1's keys read the text (width 32)
    assert sd["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape == (32, 32)
    assert unet.input_blocks[4][1].transformer_blocks[0].disable_self_attn
    assert not unet.input_blocks[7][1].transformer_blocks[0].disable_self_attn
    assert not unet.middle_block[1].transformer_blocks[0].disable_self_attn


def test_the_output_equals_diffusers():
    torch.manual_seed(0)
    ours = realistic_weights(UNetModel(TINY_X4_UNET), seed=3).eval()
    reference = diffusers.UNet2DConditionModel(**TINY_X4_UNET_DIFFUSERS).eval()
    reference.load_state_dict(unet_original_to_diffusers(ours.state_dict(), TINY_X4_UNET), strict=True)
    x, t, context, labels = _inputs()
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, class_labels=labels).sample
        got = ours(x, t, context=context, y=labels)
        # the text reaches the cross-attention-only blocks: another context moves the output far beyond tolerance
        moved = ours(x, t, context=context.flip(1) * 2, y=labels)
    assert_close_to_ref(got, expected, rel=1e-5, what="x4 U-Net vs diffusers")
    assert (moved - got).abs().max() > 1e-2 * expected.abs().max()
    back = unet_diffusers_to_original(reference.state_dict(), TINY_X4_UNET)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_the_full_size_keys_and_shapes_match_diffusers():
    config = unet_config({**X4_ORIGINAL_UNET, "sample_size": 128})
    assert config.disable_self_attentions == (True, True, True, False) and config.num_classes == 1000
    with torch.device("meta"):
        native = UNetModel(config).state_dict()
        reference = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(config)).state_dict()
    ours = unet_original_to_diffusers(native, config)
    assert set(ours) == set(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)
    assert native["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape == (512, 1024)  # cross
    assert native["input_blocks.10.1.transformer_blocks.0.attn1.to_k.weight"].shape == (1024, 1024)


def test_settings_with_no_counterpart_are_refused():
    with pytest.raises(ConfigError, match="one entry per level"):
        UNetConfig(disable_self_attentions=(True,))
    with pytest.raises(ConfigError, match="disable_middle_self_attn"):
        unet_config_to_diffusers(UNetConfig(disable_middle_self_attn=True))
    bad = {**unet_config_to_diffusers(TINY_X4_UNET), "only_cross_attention": [True, False]}
    with pytest.raises(ConfigError, match="only_cross_attention"):
        unet_config_from_diffusers(bad)
