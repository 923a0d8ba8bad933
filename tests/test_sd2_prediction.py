"""Which prediction type a bare SD-2.x single file samples with (ldm.io.sd2_prediction): the probe on networks with a
known answer, diffusers' rule on full-size shapes, and each case of the rule on tiny files `ldm-convert --to original`
wrote (test_checkpoint_layouts_parity's sd2_v: random weights, which read as v; sd2_base: an output layer fitted to
return the noise, which reads as eps). The whole images against diffusers are in test_checkpoint_layouts_parity."""
import json

import pytest
import torch
from helpers import GaussianNet, run_cli, tiny_components
from safetensors.torch import load_file, save_file
from single_files import sd1, sd2_base, sd2_v  # noqa: F401  (module fixtures)

from ldm.cli import demo
from ldm.cli import eval as eval_cli
from ldm.diffusion.schedules import ScheduleConfig
from ldm.io import original_format
from ldm.io.checkpoint import write_safetensors
from ldm.io.formats import load_model
from ldm.io.infer import infer_original_config
from ldm.io.original_format import original_state_dict
from ldm.io.sd2_prediction import EPS_SLOPE, SD2_BASE_STEP, noise_slope, step_prediction

diffusers = pytest.importorskip("diffusers")

OVERRIDE = "; override with --prediction-type"


def no_probe(monkeypatch):
    """Make running the U-Net probe a test failure: the rule must decide before it."""
    monkeypatch.setattr(original_format, "noise_slope", lambda *a, **k: pytest.fail("the U-Net was probed"))


def prediction_notes(parts) -> list[str]:
    return [n for n in parts.notes if n.startswith("prediction type")]


def test_probe_reads_exact_eps_and_v_networks():
    """The exact eps and v networks of a Gaussian data set (helpers.GaussianNet, data N(0.3, 0.8^2)) on SD's
    schedule: the slope of their output on pure noise at t=999 is the closed form, ~1 for eps and ~0 for v."""
    alphas_cumprod = torch.cumprod(1 - ScheduleConfig().betas(), 0)
    sigma = float(((1 - alphas_cumprod[-1]) / alphas_cumprod[-1]).sqrt())  # the VE sigma at t=999 (~14.6)
    alpha, var = 1 / (1 + sigma**2) ** 0.5, GaussianNet.STD**2
    expected = {"epsilon": sigma / (alpha * (var + sigma**2)),  # eps = sigma (x/alpha - mu) / (var + sigma^2)
                "v_prediction": sigma * (1 - var) / (var + sigma**2)}  # v = alpha eps - alpha sigma x0
    for kind, slope in expected.items():
        measured = noise_slope(GaussianNet(alphas_cumprod, kind), in_channels=4, context_dim=8, timestep=999)
        assert measured == pytest.approx(slope, abs=0.01), kind
        assert (measured > EPS_SLOPE) == (kind == "epsilon")
    assert expected["epsilon"] > 0.99 and expected["v_prediction"] < 0.03  # far from the threshold either way


def test_diffusers_rule_on_full_size_sd2_shapes(monkeypatch):
    """What diffusers' from_single_file infers for a full-size SD-2 file (meta tensors: shapes without memory), and
    ldm's global_step rule agreeing with it: v (stable-diffusion-2-1's config, 768 px) unless global_step is 875000."""
    from diffusers import DDIMScheduler
    from diffusers.loaders import single_file_utils as sfu

    # its legacy scheduler loader writes into this module-level dict: let it write into a copy
    monkeypatch.setattr(sfu, "SCHEDULER_DEFAULT_CONFIG", dict(sfu.SCHEDULER_DEFAULT_CONFIG))
    sd = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
          torch.empty(320, 1024, device="meta")}
    assert sfu.infer_diffusers_model_type(sd) == "v2"
    assert sfu.fetch_diffusers_config(sd) == {"pretrained_model_name_or_path": "stabilityai/stable-diffusion-2-1"}
    assert sfu.DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP["v2"] == 768  # ldm: latent 96 for a v file
    for step in (None, SD2_BASE_STEP, 140000):
        checkpoint = {**sd, **({"global_step": step} if step is not None else {})}
        theirs = sfu._legacy_load_scheduler(DDIMScheduler, checkpoint, "scheduler").config.prediction_type
        ours = step_prediction(step)
        assert theirs == ("epsilon" if step == SD2_BASE_STEP else "v_prediction")
        assert (ours is None) if step is None else ours[0] == theirs  # without a step ldm probes the U-Net


def test_bare_files_are_read_by_their_u_net(sd2_v, sd2_base):
    """No YAML, header word or global_step: the probe decides, and the note says so (and the 768 px default of v)."""
    v, base = load_model(sd2_v[2]), load_model(sd2_base[2])
    assert (v.schedule.prediction_type, v.unet.config.sample_size) == ("v_prediction", 96)
    assert (base.schedule.prediction_type, base.unet.config.sample_size) == ("epsilon", 64)
    for parts, short in ((v, "v"), (base, "eps")):
        [note] = prediction_notes(parts)
        assert note.startswith(f"prediction type: {short} (inferred from the U-Net itself: on pure noise at the last "
                               "timestep its output has slope ") and note.endswith(OVERRIDE), note
    assert any(n.startswith("default image size 192 px (latent 96), the SD-2 768-v models'") for n in v.notes)
    assert not any(n.startswith("default image size") for n in base.notes)


def test_global_step_decides_before_the_probe(sd2_v, sd2_base, tmp_path, monkeypatch):
    """A Lightning .ckpt's global_step, or one stored among a flat file's tensors (where diffusers looks), is
    diffusers' rule: 875000 (SD-2.0-base's) is eps even on the U-Net that probes as v, any other step is v even on
    the one that probes as eps."""
    no_probe(monkeypatch)
    v_weights, base_weights = load_file(str(sd2_v[2])), load_file(str(sd2_base[2]))
    cases = {"base.ckpt": (v_weights, SD2_BASE_STEP, "epsilon"), "768.ckpt": (base_weights, 140000, "v_prediction")}
    for name, (weights, step, expected) in cases.items():
        torch.save({"state_dict": weights, "global_step": step, "epoch": 3}, tmp_path / name)
        parts = load_model(tmp_path / name)
        assert parts.schedule.prediction_type == expected, name
        short = "eps" if expected == "epsilon" else "v"
        assert prediction_notes(parts) == [f"prediction type: {short} (inferred from the file's global_step {step}: "
                                           "diffusers' from_single_file rule, eps only for 875000, SD-2.0-base's "
                                           "last step)" + OVERRIDE]
    flat = tmp_path / "flat.safetensors"
    save_file({**v_weights, "global_step": torch.tensor(SD2_BASE_STEP)}, str(flat))
    parts = load_model(flat)
    assert parts.schedule.prediction_type == "epsilon"
    assert not any("global_step" in n for n in parts.notes if n.startswith("ignored"))  # read, not an unknown key


@pytest.mark.parametrize("header, weights, expected", [
    ({"modelspec.prediction_type": "v"}, "base", "v_prediction"),
    ({"modelspec.prediction_type": "epsilon"}, "v", "epsilon"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, "v", "epsilon"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "base", "v_prediction"),
    ({"ss_v_parameterization": "True"}, "base", "v_prediction"),
])
def test_the_files_header_decides_first(sd2_v, sd2_base, tmp_path, monkeypatch, header, weights, expected):
    """Stability's model-spec entries (kohya's too) in a safetensors header say what the file is, before the
    global_step and the probe; the note names the entry."""
    no_probe(monkeypatch)
    source = {"v": sd2_v[2], "base": sd2_base[2]}[weights]
    path = tmp_path / "m.safetensors"
    step = 140000 if expected == "epsilon" else SD2_BASE_STEP  # a step saying the other: the header wins
    save_file({**load_file(str(source)), "global_step": torch.tensor(step)}, str(path), metadata=header)
    parts = load_model(path)
    assert parts.schedule.prediction_type == expected
    [(key, value)] = header.items()
    assert f"(inferred from the file's header: {key}={value.lower()})" in prediction_notes(parts)[0]


def test_explicit_flags_win(sd2_v, sd2_base, tmp_path, monkeypatch):
    """--prediction-type and a YAML (given or beside the file) win over the header, global_step and probe, with
    no inference note; a YAML's parameterization is its own."""
    no_probe(monkeypatch)
    path = tmp_path / "m.safetensors"
    save_file(load_file(str(sd2_base[2])), str(path), metadata={"modelspec.prediction_type": "epsilon"})
    for given in ("v", "v_prediction"):
        parts = load_model(path, prediction_type=given)
        assert parts.schedule.prediction_type == "v_prediction" and not prediction_notes(parts)
    yaml = sd2_v[3]  # v2-inference-v.yaml: parameterization v
    assert load_model(sd2_base[2], config=yaml).schedule.prediction_type == "v_prediction"
    assert load_model(sd2_base[2], config=yaml, prediction_type="eps").schedule.prediction_type == "epsilon"


def test_sd1_and_sd2_inpainting_are_eps_without_a_probe(sd1, tmp_path, monkeypatch):
    """SD-1 files are eps; SD-2 inpainting files (9 input channels) are eps, as stable-diffusion-2-inpainting
    (diffusers' inpainting_v2 rule); neither runs the probe."""
    no_probe(monkeypatch)
    sd1_file = tmp_path / "sd1.safetensors"
    save_file(sd1[2], str(sd1_file))
    parts = load_model(sd1_file)
    assert parts.schedule.prediction_type == "epsilon"
    assert prediction_notes(parts) == ["prediction type: eps (inferred from the shapes: SD-1.x models are eps)"
                                       + OVERRIDE]
    inpainting = tmp_path / "inpainting.safetensors"
    write_safetensors(original_state_dict(tiny_components("sd2", in_channels=9)), inpainting)
    parts = load_model(inpainting)
    assert parts.schedule.prediction_type == "epsilon" and parts.unet.config.sample_size == 64
    assert prediction_notes(parts)[0].startswith("prediction type: eps (inferred from the shapes: SD-2 inpainting")


def test_without_the_rule_the_shapes_say_eps_and_so_does_the_note():
    """infer_original_config alone (no sd2_prediction: meta tensors cannot be probed) keeps its old answer."""
    config, notes = infer_original_config(original_state_dict(tiny_components("sd2")))
    assert config["model"]["params"]["parameterization"] == "eps"
    assert any("assumed eps" in n for n in notes)


# --- the doors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("main", [eval_cli.main, demo.main], ids=["ldm-eval", "ldm-demo"])
def test_bad_single_file_options_are_refused_before_the_model_loads(main, tmp_path, capsys, monkeypatch):
    """ldm-eval and ldm-demo take --config, --prediction-type and --no-ema; a bad value is exit 2 naming it."""
    monkeypatch.setattr(eval_cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    base = (["--prompts", "ldm_eval_v1", "--out", str(tmp_path / "o")] if main is eval_cli.main else [])
    for flags, message in ((["--prediction-type", "edm"], "'edm': use one of epsilon, v_prediction, sample"),
                           (["--config", str(tmp_path / "absent.yaml")], "absent.yaml: no such file")):
        code, err = run_cli(main, ["--model", "m.safetensors", *base, *flags], capsys)
        assert code == 2 and message in err, err


def test_ldm_demo_serves_the_model_as_the_flags_say(sd2_base, monkeypatch):
    """ldm-demo --prediction-type / --config / --no-ema reach the pipeline it serves."""
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    served = []
    monkeypatch.setattr(demo, "launch", lambda *a, **k: None)
    monkeypatch.setattr(demo, "build_page", lambda generator, **k: served.append(generator.pipe))
    path = ["--model", str(sd2_base[2]), "--device", "cpu"]
    for flags, expected in (([], "epsilon"), (["--prediction-type", "v"], "v_prediction"),
                            (["--no-ema", "--prediction-type", "eps"], "epsilon")):
        assert demo.main([*path, *flags]) == 0
        assert served[-1].schedule_config.prediction_type == expected, flags


def test_ldm_eval_generates_with_the_flags_and_pins_them(sd2_v, tiny_clip_config, tmp_path, capsys):
    """ldm-eval --prediction-type makes other images than the inferred v, and settings.json pins the flags: a
    resumed run with others is refused."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "eval"
    argv = ["--model", str(sd2_v[2]), "--prompts", str(prompts), "--steps", "2", "--guidance", "1", "--height", "16",
            "--width", "16", "--clip-model", str(tiny_clip_config), "--clip-pretrained", "none", "--device", "cpu"]
    assert eval_cli.main([*argv, "--out", str(out)]) == 0
    assert eval_cli.main([*argv, "--out", str(tmp_path / "eps"), "--prediction-type", "eps", "--no-ema"]) == 0
    [inferred] = (out / "samples").glob("*/*.png")
    [eps] = (tmp_path / "eps" / "samples").glob("*/*.png")
    assert inferred.read_bytes() != eps.read_bytes()
    [settings] = (tmp_path / "eps" / "samples").glob("*/settings.json")
    pinned = json.loads(settings.read_text())
    assert pinned["prediction_type"] == "epsilon" and pinned["ema"] is False and "config" not in pinned
    code, err = run_cli(eval_cli.main, [*argv, "--out", str(tmp_path / "eps"), "--prediction-type", "v"], capsys)
    assert code == 2 and "prediction_type" in err, err
