"""Tiny DeepFloyd IF components in diffusers' own classes (as diffusers' IF pipeline tests build them)."""
import torch
from helpers import realistic_weights

# diffusers' tests/pipelines/deepfloyd_if `_get_dummy_components` / `_get_superresolution_dummy_components`
IF_I_UNET = dict(
    sample_size=32, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
    addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu",
)
IF_II_UNET = {**IF_I_UNET, "layers_per_block": [1, 2], "in_channels": 6, "class_embed_type": "timestep",
              "mid_block_scale_factor": 1.414, "time_embedding_act_fn": "gelu", "time_embedding_dim": 32}
IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
                    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                    prediction_type="epsilon", variance_type="learned_range")


def diffusers_if_unet(super_resolution: bool = False, seed: int = 0, damping: float = 1.0, **overrides):
    """A tiny IF U-Net (UNet2DConditionModel) with realistic random weights, in eval mode.

    `damping` < 1 scales the last conv of every residual branch and attention output: a random IF U-Net then
    denoises smoothly enough for whole sampling loops to be compared (undamped, fp32 vs fp64 diverge).
    """
    import diffusers

    unet = diffusers.UNet2DConditionModel(**{**(IF_II_UNET if super_resolution else IF_I_UNET), **overrides})
    realistic_weights(unet, seed)
    if damping != 1.0:
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if ".conv2." in name or ".to_out.0." in name:
                    p.mul_(damping)
    return unet.eval()
