"""Tiny and full-size Stable Diffusion x4 upscaler configurations shared by the x4 tests."""
import torch

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


def tiny_diffusers_upscale_pipeline(seed: int = 0, low_res_schedule: str = "scaled_linear"):
    """diffusers' StableDiffusionUpscalePipeline with tiny random components (as diffusers' own upscale tests: the
    U-Net above, an f=4 VAE, a gelu CLIP text model in the SD-2 OpenCLIP form), DDIM v-prediction."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.tokenizers import clip_tokenizer

    torch.manual_seed(seed)  # diffusers' and transformers' own initialisation: weights at a realistic scale
    unet = diffusers.UNet2DConditionModel(**TINY_X4_UNET_DIFFUSERS)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 32, 64], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                                  scaling_factor=0.08333)
    with torch.no_grad():  # calibration: decoded images spread over the 8-bit range, neither flat nor clipped
        vae.decoder.conv_out.weight.mul_(VAE_OUT_GAIN)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=0))
    pipe = diffusers.StableDiffusionUpscalePipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(pad_token="!"),
        low_res_scheduler=diffusers.DDPMScheduler(beta_schedule=low_res_schedule),
        # clip_sample off, as in every real SD scheduler config: clipping latents to [-1, 1] (the default of a bare
        # DDIMScheduler(), which diffusers' own upscale test keeps) is not something ldm's samplers do
        scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False), max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


VAE_OUT_GAIN = 1.5  # decoded std ~56/255 with ~4% of values clipped
