"""Text encoders: parity with transformers / diffusers / open_clip, truncation warnings, freezing, masks, training."""
import copy
import re
import warnings

import pytest
import torch
from helpers import CLIP_HF, assert_close_to_ref, open_clip_text, realistic_weights

from ldm.models.text_encoders import (CLIPTextEncoder, OpenCLIPTextEncoder, SmallTextEncoder, T5TextEncoder,
                                      TextEncoderConfig, build_openclip_model, build_text_encoder)
from ldm.models.tokenizers import (ByteTokenizer, clip_tokenizer, load_tokenizer, save_tokenizer,
                                   t5_tokenizer_from_sentencepiece)

CLIP_4_HEADS = {**CLIP_HF, "num_attention_heads": 4}  # four heads: a wrong head split would show
TINY_OPENCLIP = dict(embed_dim=24, text_cfg=dict(width=32, heads=4, layers=3, context_length=77, vocab_size=49408))
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "Héllo   WORLD 3.14 it's naïve café 東京"]
LONG = " ".join(["cat"] * 75 + ["zebra", "giraffe"])  # 77 one-token words: the last two do not fit


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    return clip_tokenizer(cache_dir=tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def t5_tok(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    text = ["a photo of a cat", "a painting of a dog on the beach", "an astronaut riding a horse"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(folder / "sp"), vocab_size=24,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return t5_tokenizer_from_sentencepiece(folder / "sp.model")


def _tiny_clip(clip_tok, **kwargs) -> CLIPTextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextEncoder(CLIPTextModel(CLIPTextConfig(**CLIP_4_HEADS)), clip_tok, **kwargs)


def test_clip_tokenizer_matches_open_clip(clip_tok, tmp_path):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-H-14")(PROMPTS + [LONG])
    ids = clip_tok(PROMPTS + [LONG], padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt").input_ids
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[:, 1:] = torch.cumsum(ids == 49407, dim=1)[:, :-1] > 0  # positions after the first end-of-text
    assert torch.equal(torch.where(pad, 0, ids), reference)
    assert ids[-1, -1] == 49407 and ids[-1, -2] == reference[-1, -2]  # truncated at 77 with end-of-text last
    assert torch.equal(ids[pad], torch.full_like(ids[pad], 49407))  # SD-1 pads with <|endoftext|>
    sd2 = clip_tokenizer(cache_dir=tmp_path, pad_token="!")  # SD-2 pads with "!" (id 0), exactly as open_clip
    assert torch.equal(sd2(PROMPTS + [LONG], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids, reference)
    save_tokenizer(clip_tok, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")(PROMPTS[0]).input_ids == clip_tok(PROMPTS[0]).input_ids


def test_clip_matches_diffusers_pipeline(clip_tok):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    encoder = _tiny_clip(clip_tok)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(block_out_channels=[32]), text_encoder=encoder.hf_model,
                                   tokenizer=clip_tok, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    out = encoder.encode(PROMPTS)
    assert out.tokens.shape == (3, 77, 32) and out.mask.all()
    assert_close_to_ref(out.tokens, reference)
    ids = clip_tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = encoder.hf_model(ids, output_hidden_states=True)
        # diffusers' clip_skip=1: hidden_states[-2] then final_layer_norm
        penultimate = encoder.hf_model.final_layer_norm(ref.hidden_states[-2])
    assert_close_to_ref(out.pooled, ref.pooler_output)
    skip = _tiny_clip(clip_tok, layer="penultimate")
    skip.load_state_dict(encoder.state_dict())
    assert_close_to_ref(skip.encode(PROMPTS).tokens, penultimate)
    assert not torch.allclose(penultimate, ref.last_hidden_state, atol=1e-3)


def test_clip_keys_truncation_empty_and_frozen(clip_tok, tmp_path):
    save_tokenizer(clip_tok, tmp_path / "tok")
    encoder = build_text_encoder(TextEncoderConfig(type="clip", hf_config=CLIP_4_HEADS), tokenizer_dir=tmp_path / "tok")
    keys = set(encoder.state_dict())
    assert "transformer.text_model.embeddings.token_embedding.weight" in keys  # SD-1 cond_stage_model layout
    assert "transformer.text_model.final_layer_norm.bias" in keys
    sd = dict(encoder.state_dict(), **{"transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    encoder.load_state_dict(sd)  # old SD-1 checkpoints carry position_ids: accepted
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.hf_model.training
    with pytest.warns(UserWarning, match="zebra giraffe"):
        out = encoder.encode([LONG])
    assert not out.tokens.requires_grad and torch.isfinite(out.tokens).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = encoder.encode([""])
    ids = clip_tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :3].tolist() == [49406, 49407, 49407]
    assert_close_to_ref(empty.tokens, encoder.hf_model(ids).last_hidden_state)
    trainable = build_text_encoder(TextEncoderConfig(type="clip", hf_config=CLIP_4_HEADS, freeze=False),
                                   tokenizer_dir=tmp_path / "tok")
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.encode(["a cat"]).tokens.requires_grad


def test_openclip_penultimate_and_last():
    import open_clip

    encoder = build_text_encoder(TextEncoderConfig(type="openclip", open_clip=TINY_OPENCLIP))
    assert isinstance(encoder, OpenCLIPTextEncoder) and encoder.layer == "penultimate"
    assert not hasattr(encoder.model, "visual")
    assert "model.transformer.resblocks.2.attn.in_proj_weight" in encoder.state_dict()
    assert encoder.dim == 32 and encoder.pooled_dim == 24
    realistic_weights(encoder)  # LayerNorms away from identity
    ids = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)
    clip = open_clip_text(TINY_OPENCLIP, encoder.model.state_dict())  # open_clip's own model, the same weights
    truncated = copy.deepcopy(clip)
    truncated.transformer.resblocks = truncated.transformer.resblocks[:-1]
    with torch.no_grad():  # SD-2's FrozenOpenCLIPEmbedder: all blocks but the last, then ln_final
        x = truncated.token_embedding(ids) + truncated.positional_embedding
        reference = truncated.ln_final(truncated.transformer(x, attn_mask=truncated.attn_mask))
        pooled = clip.encode_text(ids)
    out = encoder.encode(PROMPTS)
    assert out.tokens.shape == (3, 77, 32) and out.mask.all()
    assert_close_to_ref(out.tokens, reference)
    assert_close_to_ref(out.pooled, pooled)  # pooled as open_clip: last layer, EOS, projection
    last = OpenCLIPTextEncoder(encoder.model, layer="last")
    assert_close_to_ref(last.encode(PROMPTS).pooled, pooled)
    assert not torch.allclose(last.encode(PROMPTS).tokens, reference, atol=1e-3)
    with pytest.warns(UserWarning, match="zebra giraffe"):
        encoder.encode([LONG])
    assert not any(p.requires_grad for p in encoder.parameters())


def test_openclip_named_architecture_config():
    model = build_openclip_model({"name": "RN50", "text_cfg": {**TINY_OPENCLIP["text_cfg"], "layers": 1}})
    assert len(model.transformer.resblocks) == 1 and model.text_projection.shape == (32, 1024)


def test_t5_mask_zeroing_and_pooling(t5_tok):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4))
    short, long_ = T5TextEncoder(model, t5_tok, max_length=32), T5TextEncoder(model, t5_tok, max_length=40)
    prompts = ["a cat", "a painting of a dog on the beach"]
    a, b = short.encode(prompts), long_.encode(prompts)
    lengths = [len(t5_tok(p).input_ids) for p in prompts]  # including </s>
    assert a.mask.sum(1).tolist() == lengths and b.tokens.shape == (2, 40, 32)
    assert (a.tokens[~a.mask] == 0).all() and (b.tokens[~b.mask] == 0).all()
    assert_close_to_ref(a.tokens, b.tokens[:, :32])  # padding does not leak into real tokens
    n = lengths[0]
    assert_close_to_ref(a.pooled[0], a.tokens[0, :n].mean(0))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([t5_tok(prompts[0]).input_ids])).last_hidden_state
    assert_close_to_ref(a.tokens[0, :n], ref[0])
    with pytest.warns(UserWarning, match="beach"):
        short.encode([" ".join(["a cat"] * 12) + " beach"])
    assert short.encode([""]).mask.sum().item() == 1  # just </s>


def test_small_encoder_trains_and_masks():
    config = TextEncoderConfig(type="small", small=dict(width=32, layers=2, heads=4), max_length=32)
    encoder = build_text_encoder(config)
    assert isinstance(encoder, SmallTextEncoder) and encoder.training
    assert all(p.requires_grad for p in encoder.parameters())
    alone = encoder.encode(["a cat"])
    batched = encoder.encode(["a cat", "a longer prompt about a dog"])
    assert_close_to_ref(alone.tokens[0], batched.tokens[0, :32])  # masked padding is ignored
    assert (alone.tokens[0, 7:] == 0).all() and alone.tokens[0, :7].abs().sum(dim=-1).min() > 0  # BOS a cat EOS
    assert alone.mask.all()  # the U-Net attends every position (the zeroed padding too), as it was trained to
    assert torch.allclose(alone.pooled[0], alone.tokens[0, 6])  # the EOS position
    before = [p.detach().clone() for p in encoder.parameters()]
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    loss = (batched.pooled - 1).pow(2).mean()
    loss.backward()
    optimizer.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, encoder.parameters())]
    assert all(changed[:2]) and sum(changed) > len(changed) // 2
    with pytest.warns(UserWarning, match="'cat dog bird'"):  # cut inside "cat": the whole word is named
        encoder.encode(["x" * 28 + " cat dog bird"])


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    ids, mask = tok(["héllo", ""], max_length=8)
    assert ids[0].tolist() == [1, 107, 198, 172, 111, 111, 114, 2] and tok.decode(ids[0].tolist()) == "héllo"
    assert mask[1].tolist() == [True, True] + [False] * 6
    save_tokenizer(tok, tmp_path / "bytes")
    assert isinstance(load_tokenizer(tmp_path / "bytes"), ByteTokenizer)


def test_offline_hub_id_is_a_checkpoint_error():
    from ldm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="local folder"):
        build_text_encoder(TextEncoderConfig(type="clip", pretrained="nobody/no-such-model"))


def test_a_pasted_paragraph_is_not_repeated_whole_in_the_truncation_warning():
    encoder = build_text_encoder(TextEncoderConfig(type="small", small=dict(width=32, layers=1, heads=4), max_length=32))
    with pytest.warns(UserWarning) as record:
        encoder.encode(["x" * 28 + " " + "word " * 1000])
    message = str(record[0].message)
    more = re.search(r"the dropped words are: 'word word.*' \.\.\. and (\d+) more characters$", message)
    assert more and 4700 < int(more.group(1)) < 5000 and len(message) < 400, message
