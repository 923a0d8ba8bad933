"""Tiny DeepFloyd IF components in diffusers' own classes (as diffusers' IF pipeline tests build them)."""
import torch
from helpers import SEED, realistic_weights

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


def diffusers_if_unet(super_resolution: bool = False, seed: int = 0, damping: float = 1.0, out_scale: float = 1.0,
                      **overrides):
    """A tiny IF U-Net (UNet2DConditionModel) with realistic random weights, in eval mode.

    `damping` < 1 scales the last conv of every residual branch and attention output: a random IF U-Net then
    denoises smoothly enough for whole sampling loops to be compared (undamped, fp32 vs fp64 diverge).
    """
    import diffusers

    unet = diffusers.UNet2DConditionModel(**{**(IF_II_UNET if super_resolution else IF_I_UNET), **overrides})
    realistic_weights(unet, seed)
    if damping != 1.0 or out_scale != 1.0:
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if ".conv2." in name or ".to_out.0." in name:
                    p.mul_(damping)
                if name.startswith("conv_out."):
                    p.mul_(out_scale)
    return unet.eval()


CAPTIONS = ["a photo of a cat", "a painting of a dog on the beach", "an astronaut riding a horse"]


def t5_tokenizer(folder):
    """An offline T5 tokenizer: a sentencepiece unigram model trained on the spot (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    from ldm.models.tokenizers import t5_tokenizer_from_sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS * 30), model_prefix=str(folder / "sp"),
                                   vocab_size=24, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return t5_tokenizer_from_sentencepiece(folder / "sp.model")


def tiny_t5(tokenizer, seed: int = 0):
    """A tiny transformers T5EncoderModel (transformers' own initialisation), in eval mode."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED + seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                   num_heads=4)).eval()


def if_pipeline(folder, super_resolution: bool = False, *, damping: float = 1.0, out_scale: float = 1.0, seed: int = 0,
                sample_size: int = 32, sample_max_value: float | None = None, **unet_overrides):
    """(pipeline, saved folder): a tiny IFPipeline / IFSuperResolutionPipeline, saved with save_pretrained."""
    import diffusers

    tokenizer = t5_tokenizer(folder)
    text_encoder = tiny_t5(tokenizer)
    unet = diffusers_if_unet(super_resolution, seed, damping, out_scale, sample_size=sample_size, **unet_overrides)
    cap = sample_max_value if sample_max_value is not None else (1.0 if super_resolution else 1.5)
    scheduler = diffusers.DDPMScheduler(**{**IF_SCHEDULER, "sample_max_value": cap})
    common = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                  safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if super_resolution:
        noising = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        pipe = diffusers.IFSuperResolutionPipeline(**common, image_noising_scheduler=noising)
    else:
        pipe = diffusers.IFPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    out = folder / ("IF-II" if super_resolution else "IF-I")
    pipe.save_pretrained(out)
    return pipe, out
