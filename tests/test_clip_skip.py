"""`clip_skip` gives diffusers' images: its layer rule on tiny random SD-1 (CLIP), SD-2 (OpenCLIP-style) and SDXL
(both towers) models, the negative prompt read at the same layer as the prompt, and the values it refuses.

Images are compared as floats, before 8-bit rounding: max |diff| <= 1e-5 x max |ref| + 1e-6 (float32 CPU).
"""
import json
import types

import pytest
import torch
from helpers import SD15_SCHEDULER, SEED, assert_close_to_ref, diffusers_scheduler, realistic_weights
from sdxl_helpers import save_diffusers_sdxl, scheduler_config

from ldm.errors import LdmError
from ldm.models.text_encoders import CLIPTextEncoder, OpenCLIPTextEncoder
from ldm.models.tokenizers import clip_tokenizer
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.sampling import sample

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow  # ~40 s of CPU for the parity tests, ~35 s more for the CLI, ldm-eval and demo ones

PROMPT, NEGATIVE = "a red circle on the left", "blurry"
STEPS, SIZE = 4, 32
CLIP_HF = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4, vocab_size=49408,
               max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def tiny_sd(folder, *, sd2: bool = False):
    """(folder, diffusers StableDiffusionPipeline) of a tiny SD-1 model (4-layer CLIP), or SD-2 style (a 3-layer gelu
    tower: diffusers' SD-2 layout, OpenCLIP's blocks less the last), realistic random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=32)
    text = dict(CLIP_HF, num_hidden_layers=3, hidden_act="gelu", pad_token_id=0) if sd2 else CLIP_HF
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    pipe = diffusers.StableDiffusionPipeline(
        unet=realistic_weights(unet, 1).eval(), vae=vae.eval(), text_encoder=realistic_weights(text_encoder, 2).eval(),
        tokenizer=clip_tokenizer(pad_token="!") if sd2 else clip_tokenizer(), safety_checker=None,
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER), feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    # like SD-1.5's official folder: no timestep_spacing, so each sampler's default spacing applies (in both pipelines)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.pop("timestep_spacing", None)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    # diffusers' clip_skip reads `text_encoder.text_model.final_layer_norm`: transformers 4's layout. transformers 5's
    # CLIPTextModel is the text model itself, so diffusers' own call fails on it (AttributeError); the alias, kept
    # out of the module tree, gives it the one attribute it reads.
    if not hasattr(pipe.text_encoder, "text_model"):
        object.__setattr__(pipe.text_encoder, "text_model", types.SimpleNamespace(
            final_layer_norm=pipe.text_encoder.final_layer_norm))
    return folder, pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder, pipe = tiny_sd(tmp_path_factory.mktemp("sd1") / "pipe")
    return pipe, load_pipeline(folder, device="cpu"), folder


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    folder, pipe = tiny_sd(tmp_path_factory.mktemp("sd2") / "pipe", sd2=True)
    return pipe, load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder, pipe = save_diffusers_sdxl(tmp_path_factory.mktemp("sdxl") / "base")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", scheduler_config(folder))
    return pipe, load_pipeline(folder, device="cpu")


def ours_image(pipe, negative, **settings) -> torch.Tensor:
    """Our image `h w c` in [0, 1] as floats (diffusers' output_type="np"), through the pipeline's own checks."""
    s = pipe.settings(**{"seed": 7, "steps": STEPS, "height": SIZE, "width": SIZE, **settings})
    x = sample(pipe.stage, [PROMPT], s, negative_prompts=[negative])
    return (x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)


def reference(pipe, sampler: str, size: int = SIZE, **kwargs) -> torch.Tensor:
    if sampler != "euler" or not isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        pipe.scheduler = diffusers_scheduler(sampler, SD15_SCHEDULER)
    out = pipe(PROMPT, num_inference_steps=STEPS, height=size, width=size, output_type="np",
               generator=torch.Generator().manual_seed(7), **kwargs).images[0]
    return torch.from_numpy(out)


def negative_at(pipe, clip_skip: int) -> dict:
    """diffusers' embeddings of NEGATIVE read at `clip_skip`, as its pipelines read the prompt (they read the negative
    prompt at the model's own layer whatever clip_skip; ldm reads both at the same layer)."""
    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(NEGATIVE, device="cpu", do_classifier_free_guidance=False,
                                                  clip_skip=clip_skip)
        return dict(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled)
    embeds, _ = pipe.encode_prompt(NEGATIVE, "cpu", 1, False, clip_skip=clip_skip)
    return dict(negative_prompt_embeds=embeds)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_without_guidance_is_diffusers_clip_skip(sd1, clip_skip):
    reference_pipe, ours, _ = sd1
    expected = reference(reference_pipe, "ddim", guidance_scale=1.0, clip_skip=clip_skip)
    image = ours_image(ours, None, sampler="ddim", guidance=1.0, clip_skip=clip_skip)
    assert_close_to_ref(image, expected, what=f"SD-1, clip_skip {clip_skip}, no guidance")
    plain = ours_image(ours, None, sampler="ddim", guidance=1.0)
    assert (plain - image).abs().max() > 1e-2  # the layer reaches the image


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_negative_prompt_read_at_the_same_layer(sd1, clip_skip):
    reference_pipe, ours, _ = sd1
    expected = reference(reference_pipe, "euler", guidance_scale=5.0, clip_skip=clip_skip,
                         **negative_at(reference_pipe, clip_skip))
    image = ours_image(ours, NEGATIVE, sampler="euler", guidance=5.0, clip_skip=clip_skip)
    assert_close_to_ref(image, expected, what=f"SD-1, clip_skip {clip_skip}, negative prompt")


def test_sd1_empty_negative_prompt_read_at_the_same_layer(sd1):
    """No negative prompt: the unconditional embedding is that of "" at the prompt's layer."""
    reference_pipe, ours, _ = sd1
    embeds, _ = reference_pipe.encode_prompt("", "cpu", 1, False, clip_skip=1)
    expected = reference(reference_pipe, "euler", guidance_scale=5.0, clip_skip=1, negative_prompt_embeds=embeds)
    assert_close_to_ref(ours_image(ours, None, sampler="euler", guidance=5.0, clip_skip=1), expected,
                        what="SD-1, clip_skip 1, no negative prompt")


def test_clip_skip_zero_is_the_model_own_layer(sd1):
    _, ours, _ = sd1
    assert torch.equal(ours_image(ours, NEGATIVE, sampler="euler", guidance=5.0, clip_skip=0),
                       ours_image(ours, NEGATIVE, sampler="euler", guidance=5.0))


def test_penultimate_config_and_clip_skip_add_up(sd1):
    """A CLIP encoder configured `layer: penultimate` already leaves one block out: clip_skip counts on from it."""
    _, ours, _ = sd1
    last = ours.text_encoder
    penultimate = CLIPTextEncoder(last.hf_model, last.tokenizer, "penultimate")
    prompts = [PROMPT, ""]
    assert torch.equal(penultimate.encode(prompts).tokens, last.encode(prompts, clip_skip=1).tokens)
    assert torch.equal(penultimate.encode(prompts, clip_skip=1).tokens, last.encode(prompts, clip_skip=2).tokens)
    assert penultimate.max_clip_skip() == 2 and last.max_clip_skip() == 3  # 4 layers: one must remain


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd2_folder_counts_on_from_its_penultimate_layer(sd2, clip_skip):
    """diffusers' SD-2 folder holds OpenCLIP's blocks less the last (3 here), read at their last: its clip_skip
    counts from there. ldm reads the same weights as OpenCLIP (4 blocks) at the penultimate one, plus clip_skip."""
    reference_pipe, ours = sd2
    assert isinstance(ours.text_encoder, OpenCLIPTextEncoder) and ours.text_encoder.layer == "penultimate"
    ids = reference_pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = reference_pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    diffusers_tokens = reference_pipe.text_encoder.text_model.final_layer_norm(hidden[-(clip_skip + 1)])
    assert_close_to_ref(ours.text_encoder.encode([PROMPT], clip_skip=clip_skip).tokens, diffusers_tokens,
                        what=f"SD-2 tokens, clip_skip {clip_skip}")
    expected = reference(reference_pipe, "euler", guidance_scale=5.0, clip_skip=clip_skip,
                         **negative_at(reference_pipe, clip_skip))
    image = ours_image(ours, NEGATIVE, sampler="euler", guidance=5.0, clip_skip=clip_skip)
    assert_close_to_ref(image, expected, what=f"SD-2, clip_skip {clip_skip}")
    with pytest.raises(LdmError, match="at most 2"):  # 3 diffusers layers: 2 skipped leaves the first one
        ours.settings(clip_skip=3)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_is_diffusers_clip_skip(sdxl, clip_skip):
    """Without a negative prompt SDXL's unconditional embeddings are zeros: diffusers' own clip_skip call."""
    reference_pipe, ours = sdxl
    expected = reference(reference_pipe, "euler", guidance_scale=5.0, clip_skip=clip_skip)
    image = ours_image(ours, None, sampler="euler", guidance=5.0, clip_skip=clip_skip)
    assert_close_to_ref(image, expected, what=f"SDXL, clip_skip {clip_skip}")
    cond = ours.stage.conditioning([PROMPT], [None], 1, 5.0, clip_skip)
    plain = ours.stage.conditioning([PROMPT], [None], 1, 5.0)
    assert torch.equal(cond["cond"]["y"], plain["cond"]["y"])  # the pooled embedding keeps the last layer
    assert not torch.allclose(cond["cond"]["context"], plain["cond"]["context"])


def test_sdxl_negative_prompt_read_at_the_same_layer(sdxl):
    reference_pipe, ours = sdxl
    expected = reference(reference_pipe, "euler", guidance_scale=5.0, clip_skip=1,
                         **negative_at(reference_pipe, 1))
    image = ours_image(ours, NEGATIVE, sampler="euler", guidance=5.0, clip_skip=1)
    assert_close_to_ref(image, expected, what="SDXL, clip_skip 1, negative prompt")


def test_sdxl_refuses_a_skip_past_either_tower(sdxl):
    _, ours = sdxl
    assert ours.text_encoder.max_clip_skip() == 3  # 5 layers read at the 4th: 3 more leave the first
    with pytest.raises(LdmError, match=r"clip_skip is at most 3"):
        ours(PROMPT, steps=1, clip_skip=4)


@pytest.mark.parametrize("value, match", [(-1, "negative"), (1.5, "whole number"), (True, "whole number"),
                                          ("2", "whole number")])
def test_bad_values_are_refused(tiny_sd_folder, value, match):
    pipe = load_pipeline(tiny_sd_folder, device="cpu")
    with pytest.raises(LdmError, match=match):
        pipe.settings(clip_skip=value)


def test_too_many_layers_are_refused_before_sampling(sd1):
    _, ours, _ = sd1
    with pytest.raises(LdmError, match="has 4 layers, so clip_skip is at most 3"):
        ours.batch([PROMPT], [0], steps=1, clip_skip=4)


def test_encoders_without_layers_to_skip_refuse_it(tmp_path):
    """T5 (Imagen, DeepFloyd IF) and the small byte-level encoder: clip_skip has no meaning, and the message says
    what to do."""
    from ldm.models.text_encoders import SmallTextEncoder

    with pytest.raises(LdmError, match="SmallTextEncoder, for which it has no meaning: leave --clip-skip out"):
        SmallTextEncoder(width=16, layers=2, heads=2, max_length=8).encode(["a"], clip_skip=1)


def test_t5_refuses_clip_skip():
    from transformers import T5Config, T5EncoderModel

    from ldm.models.text_encoders import T5TextEncoder

    model = T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2))
    encoder = T5TextEncoder(model, tokenizer=None)
    assert encoder.max_clip_skip() is None
    with pytest.raises(LdmError, match="T5TextEncoder, for which it has no meaning"):
        encoder.encode(["a"], clip_skip=1)  # refused before the (absent) tokenizer is reached


def test_unknown_setting_lists_clip_skip(tiny_sd_folder):
    pipe = load_pipeline(tiny_sd_folder, device="cpu")
    with pytest.raises(LdmError, match="clip_skip"):
        pipe.settings(clipskip=1)


def test_txt2img_flag_reaches_the_metadata(sd1, tmp_path):
    from ldm.cli.txt2img import main
    from ldm.pipeline.images import read_png_parameters

    folder, out = sd1[2], tmp_path / "out"
    assert main([PROMPT, "--model", str(folder), "--steps", "2", "--clip-skip", "1", "--out", str(out),
                 "--device", "cpu", "--height", "32", "--width", "32"]) == 0
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert record["clip_skip"] == 1
    assert read_png_parameters(out / record["file_name"])["clip_skip"] == 1
    assert main([PROMPT, "--model", str(folder), "--steps", "2", "--out", str(out), "--device", "cpu",
                 "--height", "32", "--width", "32"]) == 0
    assert json.loads((out / "metadata.jsonl").read_text().splitlines()[1])["clip_skip"] is None


def test_txt2img_refuses_a_negative_skip_before_loading(tmp_path, capsys):
    from ldm.cli.txt2img import main

    with pytest.raises(SystemExit) as exit_info:  # argparse: exit code 2 and the reason
        main([PROMPT, "--model", str(tmp_path / "no-such-model"), "--clip-skip", "-1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "negative" in capsys.readouterr().err


def test_txt2img_refuses_too_many_layers_before_writing(tiny_sd_folder, tmp_path, capsys):
    from ldm.cli.txt2img import main

    out = tmp_path / "out"
    assert main([PROMPT, "--model", str(tiny_sd_folder), "--clip-skip", "50", "--out", str(out), "--device",
                 "cpu"]) == 2
    assert "it has 1 layer, so clip_skip is at most 0" in capsys.readouterr().err
    assert not (out / "metadata.jsonl").exists()


def test_eval_records_clip_skip_and_refuses_it_before_generating(sd1, tiny_sd_folder, tiny_clip_config, tmp_path,
                                                                  capsys):
    from ldm.cli.eval import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    common = ["--prompts", str(prompts), "--samplers", "euler", "--steps", "1", "--guidance", "1", "--height", "32",
              "--width", "32", "--clip-model", str(tiny_clip_config), "--clip-pretrained", "none", "--clip-skip", "1"]
    out = tmp_path / "eval"
    assert main(["--model", str(sd1[2]), *common, "--out", str(out)]) == 0
    folder, = (out / "samples").iterdir()
    assert folder.name.endswith("-clipskip1")
    assert json.loads((folder / "settings.json").read_text())["clip_skip"] == 1
    record = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    assert record["clip_skip"] == 1
    assert json.loads((out / "report.json").read_text())["runs"][0]["settings"]["clip_skip"] == 1
    refused = tmp_path / "refused"  # the native tiny model's 1-layer CLIP has no layer to spare
    assert main(["--model", str(tiny_sd_folder), *common, "--out", str(refused)]) == 2
    assert "clip_skip is at most 0" in capsys.readouterr().err
    assert not list(refused.rglob("*.png"))


def test_demo_generator_passes_clip_skip(sd1, tmp_path):
    from ldm.cli.demo_page import Generator

    (_, record), = Generator(sd1[1], tmp_path).generate(PROMPT, steps=1, guidance=1.0, height=32, width=32,
                                                            clip_skip=2)
    assert record["clip_skip"] == 2
