"""SDXL's networks equal diffusers' / transformers' on the same weights: the U-Net with its micro-conditioning, both
text encoders (penultimate hidden states, concatenated) and the pooled projection (issue 14, sec. 1 and 5)."""
import pytest
import torch
from helpers import assert_close_to_ref
from sdxl_helpers import tiny_sdxl_diffusers

from ldm.errors import ConfigError
from ldm.io.infer import infer_unet
from ldm.io.keys_sdxl import sdxl_text_config_from_hf, sdxl_text_from_diffusers, sdxl_text_to_diffusers
from ldm.io.keys_unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_diffusers_to_original, \
    unet_original_to_diffusers
from ldm.models.micro_conditioning import SDXL_BASE, SDXL_REFINER, micro_values
from ldm.models.sdxl_text import SDXLTextConfig, build_sdxl_text_encoder
from ldm.models.unet import UNetConfig, UNetModel

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on the left", "", "an astronaut riding a green horse, photograph, 35mm"]


def ours_from_diffusers(parts, micro=SDXL_BASE):
    """(our U-Net, our SDXL text encoder) holding the diffusers components' weights."""
    config = unet_config_from_diffusers(dict(parts["unet"].config), micro_conditioning=micro)
    unet = UNetModel(config).eval()
    unet.load_state_dict(unet_diffusers_to_original(parts["unet"].state_dict(), config))
    first = parts["text_encoder"]
    text_config = sdxl_text_config_from_hf(first.config.to_dict() if first is not None else None,
                                           parts["text_encoder_2"].config.to_dict(), force_zeros_for_empty_prompt=True)
    text = build_sdxl_text_encoder(text_config)
    first_sd = first.state_dict() if first is not None else None
    text.load_state_dict(sdxl_text_from_diffusers(first_sd, parts["text_encoder_2"].state_dict()))
    return unet.eval(), text.eval()


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_text_encoders_and_pooled_projection_equal_diffusers(refiner):
    parts = tiny_sdxl_diffusers(refiner=refiner)
    pipe_class = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    pipe = pipe_class(**parts)
    tokens, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    _, text = ours_from_diffusers(parts, SDXL_REFINER if refiner else SDXL_BASE)
    out = text.encode(PROMPTS)
    assert out.tokens.shape == (3, 77, 32 if refiner else 64) and out.mask.all()
    assert_close_to_ref(out.tokens, tokens, what="tokens")
    assert_close_to_ref(out.pooled, pooled, what="pooled")
    # the halves are the two encoders: the first 32 columns move with CLIP ViT-L's weights only
    if not refiner:
        with torch.no_grad():
            text.clip.hf_model.embeddings.token_embedding.weight.mul_(2)
        again = text.encode(PROMPTS)
        assert not torch.allclose(again.tokens[..., :32], out.tokens[..., :32])
        torch.testing.assert_close(again.tokens[..., 32:], out.tokens[..., 32:], rtol=0, atol=0)


def test_text_keys_round_trip_bitwise():
    parts = tiny_sdxl_diffusers()
    _, text = ours_from_diffusers(parts)
    first, second = sdxl_text_to_diffusers(text.state_dict(), text_config_of(parts))
    for ours, theirs in ((first, parts["text_encoder"].state_dict()), (second, parts["text_encoder_2"].state_dict())):
        # transformers 5 holds the text model's keys without `text_model.`; files on disk have it
        theirs = {"text_model." + k.removeprefix("text_model."): v for k, v in theirs.items()
                  if not k.endswith("position_ids")}
        ours = {"text_model." + k.removeprefix("text_model."): v for k, v in ours.items()}
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def text_config_of(parts):
    return sdxl_text_config_from_hf(parts["text_encoder"].config.to_dict(), parts["text_encoder_2"].config.to_dict(),
                                    force_zeros_for_empty_prompt=True)


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_unet_equals_diffusers_with_micro_conditioning(refiner):
    parts = tiny_sdxl_diffusers(refiner=refiner)
    names = SDXL_REFINER if refiner else SDXL_BASE
    unet, _ = ours_from_diffusers(parts, names)
    assert unet.config.depth_per_level == (1, 2) and unet.config.attention_resolutions == (2,)
    assert unet.config.use_linear_in_transformer and unet.config.adm_in_channels == (72 if refiner else 80)
    g = torch.Generator().manual_seed(3)
    width = 32 if refiner else 64
    x, context, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, width, generator=g), \
        torch.randn(2, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    micro = torch.tensor([micro_values(names, 1024, 768), micro_values(names, 512, 512, {"crops_coords_top_left":
                                                                                           (64, 32)}, negative=True)])
    with torch.no_grad():
        expected = parts["unet"](x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": micro}).sample
        got = unet(x, t, context, y=pooled, micro=micro)
    assert_close_to_ref(got, expected, what="U-Net")
    # the numbers matter: another original size changes the output
    other = micro.clone()
    other[:, 0] = 256
    with torch.no_grad():
        assert (unet(x, t, context, y=pooled, micro=other) - got).abs().max() > 1e-3


def test_unet_config_and_keys_round_trip():
    parts = tiny_sdxl_diffusers()
    config = unet_config_from_diffusers(dict(parts["unet"].config))
    back = unet_config_to_diffusers(config)
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "transformer_layers_per_block", "down_block_types", "use_linear_projection"):
        want = parts["unet"].config[key]
        assert (list(want) if isinstance(want, tuple) else want) == back[key], key
    assert unet_config_from_diffusers(back) == config
    sd = parts["unet"].state_dict()
    again = unet_original_to_diffusers(unet_diffusers_to_original(sd, config), config)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    assert "label_emb.0.0.weight" in unet_diffusers_to_original(sd, config)


def test_sdxl_paper_layout_and_checks():
    """The published SDXL base layout: 3 levels, depths (0, 2, 10) in use, 2048-d context, 2816 = 1280 + 6 x 256."""
    base = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1,
                      num_head_channels=64, transformer_depth=(1, 2, 10), context_dim=2048,
                      use_linear_in_transformer=True, adm_in_channels=2816, micro_conditioning=SDXL_BASE)
    d = unet_config_to_diffusers(base)
    assert d["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert d["attention_head_dim"] == [5, 10, 20] and d["addition_time_embed_dim"] == 256
    with pytest.raises(ConfigError, match="adm_in_channels"):
        UNetConfig(adm_in_channels=1000, micro_conditioning=SDXL_BASE)
    assert SDXLTextConfig().open_clip == {"name": "ViT-bigG-14"}
    # the published layouts read back from the shapes alone (meta tensors: no memory)
    refiner = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2), num_heads=-1,
                         num_head_channels=64, transformer_depth=4, context_dim=1280, use_linear_in_transformer=True,
                         adm_in_channels=2560, micro_conditioning=SDXL_REFINER)
    for config, depth in ((base, [1, 2, 10]), (refiner, 4)):
        with torch.device("meta"):
            sd = {"model.diffusion_model." + k: v for k, v in UNetModel(config).state_dict().items()}
        params = infer_unet(sd)
        assert params["transformer_depth"] == depth and params["num_head_channels"] == 64
        assert params["attention_resolutions"] == [4, 2] and params["adm_in_channels"] == config.adm_in_channels
