"""Whole images from the checkpoint layouts users bring, each file loaded by ldm and by diffusers (the same file, the
same seed, sampler and steps): an fp16 `.ckpt` (a Lightning pickle read weights-only), a file holding both EMA and
non-EMA U-Net weights, an SD-2 768-v file with its `parameterization: v` YAML, the SDXL refiner as one file (bigG
alone, aesthetic-score conditioning) and a DeepFloyd IF folder of fp16-variant shards.

The single files are written by `ldm-convert --to original` from tiny diffusers folders whose sizes follow the
published conventions (64-wide text heads, SD-1's 8 U-Net heads), then stripped of ldm's stored config: a published
file carries none, so ldm reads the architecture from the shapes or from the YAML the test gives. diffusers reads the
same file with `from_single_file(config=<the tiny folder>)`, its offline way to find the component configs.
Images are compared as floats in [-1, 1] by relative L2; each test also shows that the difference it guards against
(fp16 rounding, the other weight set, the other prediction type, ...) is far above the tolerance. Each image test
loads and samples several tiny models in both libraries (10-25 s on a busy 2-core CPU): marked slow.
"""
import numpy as np
import pytest
import torch
from helpers import SEED, diffusers_scheduler, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from single_files import published, sd1, sd2_base, sd2_v, to_original  # noqa: F401  (module fixtures)

from ldm.cli import convert
from ldm.io.checkpoint import read_state_dict
from ldm.io.formats import load_model
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.sampling import sample
from ldm.pipeline.strategies import strategy_for

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red cube on a blue table", "blurry"
STEPS, GUIDANCE, SEED_IMAGE, SIZE = 4, 5.0, 7, 32
FP32_TOLERANCE = 1e-4  # relative L2 of two fp32 runs of the same weights (measured 2e-6 .. 2e-5)


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference|| of images in [-1, 1] (`b c h w`)."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def ldm_image(pipe, prompt=PROMPT, negative=NEGATIVE, init_image=None, **settings) -> torch.Tensor:
    """ldm's image before 8-bit quantisation, in [-1, 1]: `pipe(...)`'s own settings check, strategy and sampling."""
    common = dict(steps=STEPS, guidance=GUIDANCE, seed=SEED_IMAGE, height=SIZE, width=SIZE)
    s = pipe.settings(from_image=init_image is not None, **{**common, **settings})
    strategy = strategy_for(init_image, None, s.strength)
    with torch.no_grad():
        x = sample(pipe.stage, [prompt], s, negative_prompts=[negative], strategy=strategy)
    return x.float().clamp(-1, 1)


def diffusers_image(pipe, sampler: str, scheduler_config, prompt=PROMPT, negative=NEGATIVE, **kwargs) -> torch.Tensor:
    """diffusers' image in [-1, 1] with the scheduler that matches ldm's `sampler` (img2img: the image's size)."""
    pipe.scheduler = diffusers_scheduler(sampler, scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    size = {} if "image" in kwargs else dict(height=SIZE, width=SIZE)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE, **size, **kwargs,
               generator=torch.Generator().manual_seed(SEED_IMAGE), output_type="pt").images
    return out.float() * 2 - 1


def from_single_file(path, folder, **kwargs):
    """diffusers' StableDiffusionPipeline read from the single file, configured offline by the tiny folder."""
    return diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                              safety_checker=None, **kwargs)


@pytest.mark.slow
def test_fp16_ckpt_gives_diffusers_image(sd1, tmp_path):
    """An fp16 Lightning `.ckpt` (state_dict, global_step, epoch) loads weights-only, without --allow-pickle; its
    fp32 and bf16 images are diffusers' from_single_file of the same file."""
    folder, schedule, sd = sd1
    path = tmp_path / "model-fp16.ckpt"
    half = {k: v.half() for k, v in sd.items()}
    torch.save({"state_dict": half, "global_step": 470000, "epoch": 6}, path)
    assert load_model(path).unet.input_blocks[0][0].weight.dtype == torch.float16  # stored precision kept
    ours = load_pipeline(path, device="cpu")
    reference = from_single_file(path, folder, torch_dtype=torch.float32)
    want = diffusers_image(reference, "euler", schedule)
    error = relative_l2(ldm_image(ours, sampler="euler"), want)
    assert error < FP32_TOLERANCE, error
    exact = load_pipeline(folder, device="cpu")  # the fp32 weights the fp16 file was rounded from
    assert relative_l2(ldm_image(exact, sampler="euler"), want) > 20 * error  # fp16 rounding shows (measured 400x)

    # Lightning also pickles metrics as numpy scalars: ldm reads them as inert placeholders, weights-only still;
    # diffusers' torch.load(weights_only=True) refuses the file (the same weights were compared above)
    metadata = tmp_path / "with-metrics.ckpt"
    torch.save({"state_dict": half, "global_step": 470000, "loss": np.float64(0.12)}, metadata)
    with pytest.raises(OSError):
        from_single_file(metadata, folder)
    legacy = tmp_path / "legacy.ckpt"  # torch < 1.6's serialisation, also weights-only
    torch.save({"state_dict": half}, legacy, _use_new_zipfile_serialization=False)
    for other in (metadata, legacy):
        got = read_state_dict(other)
        assert got.keys() == half.keys() and all(torch.equal(got[k], half[k]) for k in half)

    bf16 = load_pipeline(path, device="cpu", dtype="bf16")
    reference_bf16 = from_single_file(path, folder, torch_dtype=torch.bfloat16)
    theirs_bf16, ours_bf16 = diffusers_image(reference_bf16, "euler", schedule), ldm_image(bf16, sampler="euler")
    # bf16 keeps 8 bits: two correct implementations round apart by as much as each is from fp32 (measured: ours
    # 2.9e-2, diffusers' 3.3e-2 from the fp32 image, 4.1e-2 from each other); ldm must be no worse than diffusers
    rounding = relative_l2(theirs_bf16, want)
    assert 10 * FP32_TOLERANCE < relative_l2(ours_bf16, want) < 1.5 * rounding  # it ran in bf16, and as well
    assert relative_l2(ours_bf16, theirs_bf16) < 2 * rounding


def with_ema(sd: dict, seed: int = 1) -> dict:
    """`sd` plus an EMA copy of its U-Net as CompVis' LitEma stores it (`model.diffusion_model.a.b` ->
    `model_ema.diffusion_modelab`, with `decay` and `num_updates`); the EMA weights are the trained ones moved by a
    few percent of their spread, as an EMA lags its model."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + seed)
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32)}
    for key, value in sd.items():
        if key.startswith("model.diffusion_model."):
            noise = torch.randn(value.shape, generator=generator)
            ema["model_ema." + key.removeprefix("model.").replace(".", "")] = value + 0.05 * value.std() * noise
    return {**sd, **ema}


@pytest.mark.slow
def test_ema_choice_gives_diffusers_image(sd1, tmp_path):
    """A file with both U-Net weight sets: ldm's default (the EMA weights, CompVis' choice) is diffusers'
    `from_single_file(extract_ema=True)`; `--no-ema` / `ema=False` is diffusers' default (`extract_ema=False`)."""
    folder, schedule, sd = sd1
    path = tmp_path / "both.safetensors"
    save_file(with_ema(sd), str(path))
    ema = diffusers_image(from_single_file(path, folder, extract_ema=True), "ddim", schedule)
    plain = diffusers_image(from_single_file(path, folder), "ddim", schedule)
    assert relative_l2(ema, plain) > 100 * FP32_TOLERANCE  # the two weight sets give different images
    errors = {"ema": relative_l2(ldm_image(load_pipeline(path, device="cpu"), sampler="ddim"), ema),
              "no-ema": relative_l2(ldm_image(load_pipeline(path, device="cpu", ema=False), sampler="ddim"), plain)}
    assert max(errors.values()) < FP32_TOLERANCE, errors


@pytest.mark.slow
def test_sd2_768_v_with_its_yaml_gives_diffusers_image(sd2_v, tmp_path):
    """`parameterization: "v"` in the YAML given with the file (`--config`, `load_pipeline(config=)`, or the YAML
    beside it) samples as v-prediction: diffusers' image of the same file with SD-2.1's v-prediction scheduler."""
    folder, schedule, path, yaml = sd2_v
    assert "parameterization: v" in yaml.read_text()
    reference = from_single_file(path, folder)
    want = diffusers_image(reference, "dpmpp_2m", schedule)
    ours = load_pipeline(path, device="cpu", config=yaml)
    assert ours.schedule_config.prediction_type == "v_prediction"
    error = relative_l2(ldm_image(ours, sampler="dpmpp_2m"), want)
    assert error < FP32_TOLERANCE, error
    beside = tmp_path / "768-v-ema.safetensors"  # the web UIs' convention: model.yaml next to model.safetensors
    beside.symlink_to(path)
    beside.with_suffix(".yaml").symlink_to(yaml)
    assert relative_l2(ldm_image(load_pipeline(beside, device="cpu"), sampler="dpmpp_2m"), want) < FP32_TOLERANCE
    by_flag = load_pipeline(path, device="cpu", prediction_type="v")  # shapes + the prediction type
    assert relative_l2(ldm_image(by_flag, sampler="dpmpp_2m"), want) < FP32_TOLERANCE
    # neither: inferred v from the U-Net (a random one reads as v: it does not return the noise), as diffusers'
    # from_single_file reads a full-size SD-2 file without global_step (stable-diffusion-2-1's config, 768 px)
    bare = load_pipeline(path, device="cpu")
    assert bare.schedule_config.prediction_type == "v_prediction" and bare.stage.default_size == 96 * 2
    assert relative_l2(ldm_image(bare, sampler="dpmpp_2m"), want) < FP32_TOLERANCE
    eps = load_pipeline(path, device="cpu", prediction_type="eps")  # the flag wins, and the image is another one
    assert eps.schedule_config.prediction_type == "epsilon"
    assert relative_l2(ldm_image(eps, sampler="dpmpp_2m"), want) > 0.1


@pytest.mark.slow
def test_bare_sd2_base_file_samples_as_eps_as_diffusers_told_eps(sd2_base):
    """A bare SD-2-base-like file (no YAML, no global_step, the U-Net returns the noise at the last timestep): ldm's
    probe reads eps, and its image is diffusers' from_single_file of the same file with an eps scheduler. (diffusers'
    own rule would read a full-size file of this kind as v: any SD-2 file without global_step 875000 is
    stable-diffusion-2-1 to it, test_sd2_prediction.py shows; this tiny one's 64-wide text is not SD-2 to it.)"""
    folder, schedule, path = sd2_base
    ours = load_pipeline(path, device="cpu")
    assert ours.schedule_config.prediction_type == "epsilon" and ours.stage.default_size == 64 * 2  # 512-base: latent 64
    want = diffusers_image(from_single_file(path, folder), "euler", schedule)
    error = relative_l2(ldm_image(ours, sampler="euler"), want)
    assert error < FP32_TOLERANCE, error
    v = diffusers_image(from_single_file(path, folder), "euler", {**schedule, "prediction_type": "v_prediction"})
    assert relative_l2(ldm_image(ours, sampler="euler"), v) > 0.1  # the other reading is another image


@pytest.mark.slow
def test_sd2_768_v_through_ldm_txt2img(sd2_v, tmp_path, capsys):
    """ldm-txt2img --config v2-inference-v.yaml, or --prediction-type v, makes diffusers' image of the file."""
    from ldm.cli import txt2img

    folder, schedule, path, yaml = sd2_v
    want = diffusers_image(from_single_file(path, folder), "dpmpp_2m", schedule)[0].permute(1, 2, 0).numpy()
    for flags in (["--config", yaml], ["--prediction-type", "v"]):
        out = tmp_path / flags[0].strip("-")
        args = [PROMPT, "--model", path, "--negative-prompt", NEGATIVE, "--sampler", "dpmpp_2m", "--steps", STEPS,
                "--guidance", GUIDANCE, "--seed", SEED_IMAGE, "--height", SIZE, "--width", SIZE, "--device", "cpu",
                "--out", out, *flags]
        code, err = run_cli(txt2img.main, args, capsys)
        assert code == 0, err
        image = np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.float64) / 127.5 - 1
        assert np.abs(image - want).mean() < 1 / 127.5, flags  # within one 8-bit level


# --- SDXL refiner ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sdxl_refiner_single_file_gives_diffusers_image(tmp_path):
    """Stability's refiner layout (OpenCLIP bigG alone under conditioner.embedders.0, sd_xl_refiner.yaml beside it):
    img2img with a chosen aesthetic score (and negative score) is diffusers' StableDiffusionXLImg2ImgPipeline of the
    same file."""
    from sdxl_helpers import save_diffusers_sdxl, scheduler_config

    # bigG's heads 64 wide, as published (the file does not store them)
    folder, _ = save_diffusers_sdxl(tmp_path / "refiner", refiner=True, bigg_width=64, bigg_heads=1)
    path = to_original(folder, tmp_path / "sd_xl_refiner.safetensors")
    assert any(k.startswith("conditioner.embedders.0.model.") for k in load_file(str(path)))
    published(path, yaml=True)
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(folder),
                                                                            local_files_only=True)
    assert reference.config.requires_aesthetics_score and reference.text_encoder is None
    rng = np.random.default_rng(SEED)
    start = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    scores = dict(aesthetic_score=7.5, negative_aesthetic_score=1.5)
    ours = load_pipeline(path, device="cpu")
    images = {}
    for name, given in (("chosen", scores), ("default", {})):
        want = diffusers_image(reference, "euler", scheduler_config(folder), image=start, strength=0.5, **given)
        got = ldm_image(ours, init_image=start, strength=0.5, sampler="euler", micro_conditioning=given)
        error = relative_l2(got, want)
        assert error < FP32_TOLERANCE, (name, error)
        images[name] = want
    assert relative_l2(images["chosen"], images["default"]) > 100 * FP32_TOLERANCE  # the score moves the image


# --- DeepFloyd IF ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_if_folder_of_fp16_variant_shards_gives_diffusers_image(tmp_path):
    """An IF stage I folder as DeepFloyd publishes it: only `*.fp16*.safetensors` shards and their
    `*.safetensors.index.fp16.json` indexes (U-Net and T5). ldm reads them as they are; its DDPM image is diffusers'
    IFPipeline.from_pretrained(variant="fp16") of the same folder."""
    from if_helpers import if_pipeline

    pipe, exact = if_pipeline(tmp_path / "fp32", sample_size=16, damping=0.5)  # damped: a smooth loop (if_helpers)
    folder = tmp_path / "IF-I-fp16"
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", max_shard_size="100KB")
    (folder / "text_encoder" / "model.fp16.safetensors").unlink()  # the tiny T5 in shards too, as T5-XXL is
    pipe.text_encoder.save_pretrained(folder / "text_encoder", variant="fp16", max_shard_size="10KB")
    for component, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        files = sorted(p.name for p in (folder / component).iterdir() if "safetensors" in p.name)
        assert f"{stem}.safetensors.index.fp16.json" in files and len(files) > 2, files  # an index and its shards
        assert all(".fp16" in name for name in files), files
    reference = diffusers.IFPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    want = reference(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt",
                     generator=torch.Generator().manual_seed(SEED_IMAGE), clean_caption=False).images
    want = want.float().clamp(-1, 1)
    ours = load_pipeline(folder, device="cpu")
    assert load_model(folder).unet.input_blocks[0][0].weight.dtype == torch.float16  # the shards' precision, kept
    settings = dict(negative=None, sampler="ddpm", height=16, width=16)
    error = relative_l2(ldm_image(ours, **settings), want)
    assert error < FP32_TOLERANCE, error
    fp32 = ldm_image(load_pipeline(exact, device="cpu"), **settings)  # the weights before fp16 rounding
    assert relative_l2(fp32, want) > 20 * error  # the shards' fp16 weights were used (measured 700x)


def test_prediction_type_is_checked_before_the_model_loads(tmp_path, capsys):
    """--prediction-type takes diffusers' names or eps / v / x0; anything else (EDM included: its schedule is not a
    discrete one) is refused by ldm-txt2img and ldm-convert alike, naming the choices."""
    from ldm.cli import txt2img

    missing = tmp_path / "absent.safetensors"
    for main, argv in ((txt2img.main, ["a cat", "--model", missing, "--out", tmp_path / "o"]),
                       (convert.main, [missing, tmp_path / "d", "--to", "native"])):
        code, err = run_cli(main, [*argv, "--prediction-type", "edm"], capsys)
        assert code == 2 and "'edm': use one of epsilon, v_prediction, sample (or eps, v, x0)" in err, err
