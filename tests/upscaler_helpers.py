"""Tiny and full-size Stable Diffusion x4 upscaler configurations shared by the x4 tests."""
from ldm.models.unet import UNetConfig

# diffusers' own upscale-pipeline tests (`dummy_cond_unet_upscale`): 7 input channels, the noise level as one of 100
# class labels, cross-attention only (no self-attention) at the two attention levels of three.
TINY_X4_UNET_DIFFUSERS = dict(
    block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=32, in_channels=7, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False), num_class_embeds=100,
)
# The same network in CompVis terms.
TINY_X4_UNET = UNetConfig(in_channels=7, out_channels=4, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2,
                          attention_resolutions=(4, 2), num_heads=8, context_dim=32, use_linear_in_transformer=True,
                          num_classes=100, disable_self_attentions=(True, True, False), sample_size=32)

# stabilityai/stable-diffusion-x4-upscaler's x4-upscaling.yaml (`model.params.unet_config.params`).
X4_ORIGINAL_UNET = dict(num_classes=1000, image_size=128, in_channels=7, out_channels=4, model_channels=256,
                        attention_resolutions=[2, 4, 8], num_res_blocks=2, channel_mult=[1, 2, 2, 4],
                        disable_self_attentions=[True, True, True, False], disable_middle_self_attn=False,
                        num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=1024,
                        legacy=False, use_linear_in_transformer=True)
