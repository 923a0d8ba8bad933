"""An SR stage's start strength (SDEdit for super-resolution): strength 1 is Imagen's start from pure noise, bit for
bit the old path; below 1 the sampler starts at the clean upsampled image plus sigma * noise and runs int(steps * s)
steps. The option reaches the stage from its config, `load_cascade`, a call, `ldm-txt2img --upscale-strength` and
the metadata."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldm import load_cascade
from ldm.cli.eval import main as eval_main
from ldm.cli.txt2img import main
from ldm.config import from_dict, load_yaml
from ldm.diffusion.conditioning import add_conditioning
from ldm.diffusion.noise_augmentation import StageConfig, conditioning_image, upsample
from ldm.diffusion.plans import sampling_plan
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import ConfigError, LdmError
from ldm.io.components import ModelParts
from ldm.io.native_format import save_native
from ldm.models.efficient_unet import EfficientUNet
from ldm.pipeline.images import from_pil, read_png_parameters
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings
from ldm.pipeline.strategies import Start, draw_noise
from ldm.pipeline.super_resolution import SuperResolution

from helpers import stage_parts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--sampler", "ddim", "--guidance", "3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base (16 px); sr (16 -> 32 px, config strength 1) and sr_half (the same weights, stage.start_strength 0.5)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("strength")
    base = stage_parts("base")
    sr = stage_parts("sr", base.text_encoder)
    half = ModelParts(unet=sr.unet, text_encoder=sr.text_encoder, schedule=sr.schedule,
                      config={**sr.config, "stage": {**sr.config["stage"], "start_strength": 0.5}})
    for name, parts in {"base": base, "sr": sr, "sr_half": half}.items():
        save_native(parts, root / name)
    return {name: root / name for name in ("base", "sr", "sr_half")}


@pytest.fixture(scope="module")
def cascade(models):
    """base -> sr (config strength 1), loaded once."""
    return load_cascade(models["base"], [models["sr"]], device="cpu", dtype="fp32")


def run(*argv) -> int:
    return main([str(a) for a in argv])


def low_res_images(batch: int = 2, size: int = 16) -> torch.Tensor:
    """Known low-res images: smooth ramps in [-0.8, 0.8], different per channel and image."""
    ramp = torch.linspace(-0.8, 0.8, size)
    return torch.stack([torch.stack([ramp[None, :] * (c - 1) + ramp[:, None] * (0.5 * b) for c in range(3)])
                        for b in range(batch)]).clamp(-1, 1)


class ImagenStart:
    """The SR start before the strength existed (frozen copy): x from pure noise drawn first, then the augmentation's
    noise. Strength 1 must stay bitwise this, so that old seeds reproduce."""

    def __init__(self, low_res, aug_level, resize_mode="bicubic"):
        self.low_res, self.aug_level, self.resize_mode = low_res, aug_level, resize_mode

    def start(self, stage, shape, plan, cond, denoiser, generator) -> Start:
        x = draw_noise(shape, generator, stage) * plan.init_noise_scale
        low_res = self.low_res.to(stage.device, stage.dtype)
        if low_res.shape[0] != shape[0]:
            low_res = low_res.repeat_interleave(shape[0] // low_res.shape[0], dim=0)
        noise = draw_noise((shape[0], low_res.shape[1], *shape[2:]), generator, stage)
        image = conditioning_image(low_res, tuple(shape[2:]), self.aug_level, noise, self.resize_mode)
        level = torch.full((shape[0],), float(self.aug_level), device=stage.device)
        return Start(x, plan, add_conditioning(cond, concat=image, aug_level=level), denoiser)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a"])
def test_strength_1_is_the_old_start_bit_for_bit(cascade, sampler):
    sr = cascade.stages[1]
    settings = GenerationSettings(sampler=sampler, steps=3, guidance=3.0, seed=5, n=2, height=32, width=32)
    low = low_res_images(1)
    new = sample(sr, ["a red circle"], settings, strategy=SuperResolution(low, 0.25))
    old = sample(sr, ["a red circle"], settings, strategy=ImagenStart(low, 0.25))
    assert torch.equal(new, old)


def _start(strength: float, sampler: str = "ddim", steps: int = 10, seed: int = 3):
    """SuperResolution.start on known low-res images, with a stand-in stage: what the sampler would begin from."""
    stage = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, sample_dtype=torch.float32)
    plan = sampling_plan(ScheduleConfig(beta_schedule="cosine"), sampler, steps)
    strategy = SuperResolution(low_res_images(), 0.3, "bicubic", strength)
    start = strategy.start(stage, (2, 3, 32, 32), plan, {}, None, torch.Generator().manual_seed(seed))
    return start, plan


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75])
def test_the_first_x_is_the_clean_upsample_noised_to_the_first_sigma(strength):
    start, full = _start(strength)
    g = torch.Generator().manual_seed(3)
    noise, aug_noise = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)  # that order
    skipped = 10 - int(10 * strength)  # diffusers' rule: run int(steps * strength)
    assert len(start.plan.sigmas) - 1 == int(10 * strength)
    assert torch.equal(start.plan.sigmas, full.sigmas[skipped:])
    assert torch.equal(start.plan.timesteps, full.timesteps[skipped:])
    clean = upsample(low_res_images(), 32)  # not the augmented conditioning image
    expected = clean + full.sigmas[skipped] * noise
    assert (start.x - expected).abs().max() <= 1e-6 * expected.abs().max()
    # The conditioning, and the noise the x is built from, are those of strength 1 with the same seed.
    pure, _ = _start(1.0)
    assert torch.equal(start.cond["concat"], pure.cond["concat"])
    assert torch.equal(start.cond["concat"], conditioning_image(low_res_images(), 32, 0.3, aug_noise))
    assert torch.equal(pure.x, noise * full.init_noise_scale)
    assert torch.equal(start.cond["aug_level"], torch.full((2,), 0.3))


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength, calls", [(1.0, 10), (0.55, 5), (0.3, 3), (0.1, 1)])
def test_a_strength_runs_int_steps_times_strength_network_calls(cascade, monkeypatch, sampler, strength, calls):
    seen = []
    forward = EfficientUNet.forward

    def spy(self, x, timesteps, *args, **kwargs):
        if kwargs.get("aug_level") is not None:  # the SR stage's calls only
            seen.append(timesteps)
        return forward(self, x, timesteps, *args, **kwargs)

    monkeypatch.setattr(EfficientUNet, "forward", spy)
    cascade("a red circle", seed=0, stage_steps=[1, 10], sampler=sampler, guidance=1.0, upscale_strength=strength)
    assert len(seen) == calls


class TruthNetwork(nn.Module):
    """An x0-predicting SR network that knows the answer: it returns `truth` whatever it is given."""

    def __init__(self, truth: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(sample_size=truth.shape[-1], downsample_factor=1, in_channels=6, context_dim=32)
        self.register_buffer("truth", truth)

    def forward(self, x, timesteps, context=None, context_mask=None, aug_level=None):
        return self.truth.expand(x.shape[0], -1, -1, -1)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.7, 1.0])
def test_an_oracle_sr_stage_reproduces_the_truth_from_any_start(sampler, strength):
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(1, 3, 32, 32, generator=g) * 1.6 - 0.8
    text = stage_parts("base").text_encoder
    parts = ModelParts(unet=TruthNetwork(truth), text_encoder=text,
                       schedule=ScheduleConfig(beta_schedule="cosine", prediction_type="sample"),
                       config={"stage": {"resolution": 32, "low_res_size": 16, "aug_level": 0.0},
                               "text_encoder": {"type": "small", "freeze": True,
                                                "small": {"width": 32, "layers": 1, "heads": 2}},
                               "scheduler": {}})
    stage = Pipeline(parts).stage
    settings = GenerationSettings(sampler=sampler, steps=10, guidance=1.0, height=32, width=32, dynamic_threshold=0)
    low = torch.zeros(1, 3, 16, 16)  # a wrong low-res image: the oracle's answer must win from any start
    out = sample(stage, ["a picture"], settings, strategy=SuperResolution(low, 0.0, strength=strength))
    assert (out - truth).abs().max() <= 1e-5 * truth.abs().max() + 1e-6


def test_the_config_default_applies_and_a_call_overrides_it(models, cascade):
    half = load_cascade(models["base"], [models["sr_half"]], device="cpu", dtype="fp32")
    full = cascade
    call = dict(seed=2, steps=2, guidance=3.0, sampler="ddim")
    by_config = np.asarray(half("a red circle", **call)[0])
    assert np.array_equal(by_config, np.asarray(full("a red circle", upscale_strength=0.5, **call)[0]))
    assert not np.array_equal(by_config, np.asarray(full("a red circle", **call)[0]))  # the default, 1, differs
    assert np.array_equal(np.asarray(full("a red circle", **call)[0]),
                          np.asarray(half("a red circle", upscale_strength=1.0, **call)[0]))
    settings = GenerationSettings(**call)
    assert half.records(settings)[1]["start_strength"] == 0.5
    assert half.records(settings, upscale_strength=0.25)[1]["start_strength"] == 0.25
    assert "start_strength" not in half.records(settings)[0]  # the base starts from noise: no strength of its own
    built = load_cascade(models["base"], [models["sr_half"]], device="cpu", dtype="fp32", upscale_strength=0.75)
    assert built.records(settings)[1]["start_strength"] == 0.75


def test_the_cli_records_the_strength_and_a_saved_stage_1_upscales_to_the_same_image(models, tmp_path):
    out = tmp_path / "full"
    assert run("a blue square", "--model", models["base"], "--upscaler", models["sr"], "--out", out,
               "--stage-steps", "3,6", "--upscale-strength", "0.5", "--seed", 7, *FAST) == 0
    record = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert read_png_parameters(out / record["file_name"]) == record
    assert record["stages"][1]["start_strength"] == 0.5 and record["stages"][1]["steps"] == 6
    stage1 = tmp_path / "stage1"
    assert run("a blue square", "--model", models["base"], "--out", stage1, "--steps", 3, "--seed", 7, *FAST) == 0
    upscaled = tmp_path / "upscaled"
    assert run("a blue square", "--model", models["base"], "--upscaler", models["sr"], "--out", upscaled,
               "--stage-steps", "3,6", "--upscale-strength", "0.5", "--seed", 7, *FAST,
               "--init-image", next(stage1.glob("*.png")), "--start-stage", 2) == 0
    again = json.loads((upscaled / "metadata.jsonl").read_text())
    assert again["stages"][1]["start_strength"] == 0.5 and again["stages"][0]["ran"] is False
    a = from_pil(Image.open(out / record["file_name"]))
    b = from_pil(Image.open(upscaled / again["file_name"]))
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)


@pytest.mark.parametrize("strength", ["0", "1.5", "-0.2", "nan"])
def test_a_strength_outside_0_1_exits_2_before_writing(models, tmp_path, capsys, strength):
    out = tmp_path / "out"
    try:
        code = run("a cat", "--model", models["base"], "--upscaler", models["sr"], "--out", out, "--steps", 2,
                   "--upscale-strength", strength, *FAST)
    except SystemExit as e:  # argparse refuses a number that is not finite
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "--upscale-strength" in err and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3", "--upscale-strength", "0.3"], "stage 2 starts at strength 0.3"),  # int(3 * 0.3) = 0 steps
    (["--steps", "2", "--strength", "0.3"], "a cascade upscales: --mask and --strength do not apply"),
])
def test_a_strength_that_leaves_no_step_and_imgs_strength_are_refused(models, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert run("a cat", "--model", models["base"], "--upscaler", models["sr"], "--out", out, *FAST, *argv) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_without_an_upscaler_the_flag_is_a_cascade_option(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("a cat", "--model", models["base"], "--out", out, "--upscale-strength", "0.3", *FAST) == 2
    assert "--upscale-strength: cascade options" in capsys.readouterr().err and not out.exists()


def test_bad_strengths_are_refused_in_python_and_in_configs(models, cascade):
    with pytest.raises(LdmError, match=r"--upscale-strength must lie in \(0, 1\]"):
        load_cascade(models["base"], [models["sr"]], upscale_strength=0.0)
    with pytest.raises(LdmError, match=r"--upscale-strength must lie in \(0, 1\]"):
        cascade("a cat", steps=2, upscale_strength=1.01)
    with pytest.raises(LdmError, match="leaves no step to run"):
        cascade("a cat", steps=4, upscale_strength=0.2)
    with pytest.raises(LdmError, match=r"must lie in \(0, 1\]"):
        SuperResolution(low_res_images(), 0.1, strength=0.0)
    with pytest.raises(LdmError, match="with 10 steps, which leaves no step to run"):
        _start(0.05)  # the strategy itself refuses it too (tools, training previews): int(10 * 0.05) = 0
    for bad in (0.0, 1.2, -1.0):
        with pytest.raises(ConfigError, match=r"stage.start_strength=.* must lie in \(0, 1\]"):
            StageConfig(resolution=32, low_res_size=16, start_strength=bad)


def test_the_emoji_upscaler_starts_part_way_as_its_bundle_does_and_every_paper_stage_from_noise():
    bundled = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "default-upscaler" / "config.yaml"
    for path in sorted(CONFIGS.glob("imagen-*.yaml")):
        section = load_yaml(path)["model"].get("stage")
        if section is None:
            continue
        strength = from_dict(StageConfig, section, where="stage").start_strength
        if path.name != "imagen-sr-emoji.yaml":
            assert strength == 1.0, path.name  # the paper's stages start from pure noise
            continue
        assert 0.0 < strength < 1.0
        if bundled.is_file():  # the recipe's sampling defaults are the bundle's
            shipped = load_yaml(bundled)["stage"]
            assert {k: shipped[k] for k in ("start_strength", "steps", "guidance")} == \
                {k: section[k] for k in ("start_strength", "steps", "guidance")}


def _eval_sr():
    path = Path(__file__).resolve().parents[1] / "tools" / "eval_sr.py"
    spec = importlib.util.spec_from_file_location("eval_sr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_sr_upscale_takes_the_strength_and_defaults_to_the_config(models, tmp_path, capsys):
    eval_sr = _eval_sr()
    inputs = tmp_path / "inputs"
    (inputs / "low").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 60, 20)).save(inputs / "low" / "k0.png")
    (inputs / "captions.jsonl").write_text(json.dumps({"key": "k0", "caption": "an orange square"}) + "\n")
    common = ["upscale", "--inputs", inputs, "--steps", 4, "--device", "cpu", "--dtype", "fp32"]
    assert eval_sr.main([str(a) for a in [*common, "--model", models["sr_half"], "--out", tmp_path / "cfg"]]) == 0
    assert eval_sr.main([str(a) for a in [*common, "--model", models["sr"], "--out", tmp_path / "flag",
                                          "--strength", "0.5"]]) == 0
    assert eval_sr.main([str(a) for a in [*common, "--model", models["sr"], "--out", tmp_path / "full"]]) == 0
    by_config, by_flag, full = (np.asarray(Image.open(tmp_path / d / "k0.png")) for d in ("cfg", "flag", "full"))
    assert by_config.shape == (32, 32, 3) and np.array_equal(by_config, by_flag)
    assert not np.array_equal(by_config, full)
    assert eval_sr.main([str(a) for a in [*common, "--model", models["sr"], "--out", tmp_path / "bad",
                                          "--strength", "0.2"]]) == 2  # int(4 * 0.2) = 0 steps
    assert "leaves no step to run" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_an_ldm_eval_sweep_over_start_strengths(models, tiny_clip_config, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "eval"
    argv = ["--model", models["base"], "--upscaler", models["sr"], "--upscale-strengths", "1,0.5", "--prompts",
            prompts, "--samplers", "ddim", "--steps", "4", "--guidance", "3", "--batch-size", "1", "--clip-model",
            tiny_clip_config, "--clip-pretrained", "none", "--out", out]
    assert eval_main([str(a) for a in argv]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["settings"]["upscale_strength"] for r in report["runs"]] == [1.0, 0.5]
    folders = [out / "samples" / f"ddim-steps4-cfg3-start{s}" for s in ("1", "0.5")]
    records = [json.loads((f / "metadata.jsonl").read_text()) for f in folders]
    assert [r["upscale_strength"] for r in records] == [1.0, 0.5] and records[0]["seed"] == records[1]["seed"]
    image = np.asarray(Image.open(folders[1] / records[1]["file_name"]))
    cascade = load_cascade(models["base"], [models["sr"]], device="cpu")
    alone = np.asarray(cascade("a red circle", seed=records[1]["seed"], sampler="ddim", steps=4, guidance=3.0,
                               upscale_strength=0.5)[0])
    assert np.abs(alone.astype(int) - image.astype(int)).max() <= 1  # the cascade's own image (batched: +-1)
    assert "upscale_strength=0.5" in (out / "index.html").read_text()

    capsys.readouterr()
    bad = [str(a) for a in argv]
    bad[bad.index("1,0.5")] = "0.2"  # int(4 * 0.2) = 0 steps
    assert eval_main(bad) == 2
    assert "leaves no step to run" in capsys.readouterr().err
    bad[bad.index("0.2")] = "1.5"
    assert eval_main(bad) == 2
    assert "--upscale-strengths must lie in (0, 1]" in capsys.readouterr().err


def test_a_cascade_with_only_a_latent_upscaler_refuses_the_strength(models, tmp_path):
    pytest.importorskip("diffusers")
    from upscaler_helpers import tiny_diffusers_upscale_pipeline

    torch.manual_seed(0)
    tiny_diffusers_upscale_pipeline().save_pretrained(tmp_path / "x4")
    with pytest.raises(LdmError, match="--upscale-strength is a pixel super-resolution stage's; this cascade has none"):
        load_cascade(models["base"], [tmp_path / "x4"], device="cpu", dtype="fp32", upscale_strength=0.5)
    cascade = load_cascade(models["base"], [tmp_path / "x4"], device="cpu", dtype="fp32")
    assert "start_strength" not in cascade.records(GenerationSettings(steps=2))[1]  # its input noise is noise_level
