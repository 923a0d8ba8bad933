"""ldm-eval --model without --samplers / --steps / --guidance samples at the model's own defaults (its config's `stage`
section; a cascade's per stage), else at ldm-eval's; what is given wins, axis by axis; every record says what ran."""
import json

import numpy as np
import pytest
from PIL import Image
from helpers import stage_parts, write_tiny_sd

import ldm.pipeline.cascade
import ldm.pipeline.pipeline
from ldm.cli.eval import EVAL_DEFAULTS, main
from ldm.io.native_format import save_native
from ldm.pipeline.cascade import load_cascade
from ldm.pipeline.load import load_pipeline

OWN = {"sampler": "ddim", "steps": 2, "guidance": 2.5}  # none of them ldm-eval's own (euler, 30, 7.5)
SMALL = ["--height", "16", "--width", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """A tiny latent model whose config.yaml carries its own sampling defaults (OWN)."""
    folder = write_tiny_sd(tmp_path_factory.mktemp("own") / "model")
    with open(folder / "config.yaml", "a") as f:  # config.yaml is outside the weights manifest
        f.write("stage:\n" + "".join(f"  {k}: {v}\n" for k, v in OWN.items()))
    assert load_pipeline(str(folder), device="cpu").stage.default_settings == OWN
    return folder


@pytest.fixture
def sampled(monkeypatch):
    """(sampler, steps, guidance) of every call of the one sampling function, a stage per call."""
    calls = []
    for module in (ldm.pipeline.pipeline, ldm.pipeline.cascade):
        def spy(stage, prompts, settings, *, _real=module.sample, **kwargs):
            calls.append((settings.sampler, settings.steps, settings.guidance))
            return _real(stage, prompts, settings, **kwargs)
        monkeypatch.setattr(module, "sample", spy)
    return calls


def _eval(model, prompts, out, clip, *flags, upscalers=()):
    argv = ["--model", model, *(a for m in upscalers for a in ("--upscaler", m)), "--prompts", prompts, *flags,
            "--clip-model", clip, "--clip-pretrained", "none", "--out", out]
    assert main([str(a) for a in argv]) == 0
    report = json.loads((out / "report.json").read_text())
    (run,) = report["runs"]
    folder = out / "samples" / run["settings"]["images"].rsplit("/", 1)[-1]
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    stored = json.loads((folder / "settings.json").read_text())
    return report, run["settings"], folder, records, stored


def _ran(settings: dict) -> tuple:
    return settings["sampler"], settings["steps"], settings["guidance"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def test_a_sweep_without_axes_samples_at_the_models_own_defaults(own_model, prompts, tiny_clip_config, tmp_path,
                                                                  sampled, capsys):
    out = tmp_path / "eval"
    report, settings, folder, records, stored = _eval(own_model, prompts, out, tiny_clip_config, *SMALL)
    want = (OWN["sampler"], OWN["steps"], OWN["guidance"])
    assert sampled == [want]  # one batch of both prompts, at the model's sampler, steps and guidance
    assert folder.name == "ddim-steps2-cfg2.5"
    assert _ran(settings) == _ran(stored) == want and all(_ran(r) == want for r in records)
    assert report["sampling"] == {name: {"values": [OWN[name]], "from": "model"} for name in OWN}
    assert "sampling: sampler ddim (the model's own), steps 2 (the model's own), guidance 2.5 (the model's own)" \
        in capsys.readouterr().err
    # each image is the one `pipe(prompt, seed=...)` makes with no settings given: the model's own defaults
    pipe = load_pipeline(str(own_model), device="cpu")
    alone = np.asarray(pipe(records[1]["text"], seed=records[1]["seed"], height=16, width=16)[0]).astype(int)
    image = np.asarray(Image.open(folder / records[1]["file_name"])).astype(int)
    assert np.abs(alone - image).max() <= 1  # batched with another prompt: +-1 at most (tests/test_eval_batched*)

    sampled.clear()  # a rerun resumes the same folder: nothing is generated again
    assert _eval(own_model, prompts, out, tiny_clip_config, *SMALL)[2] == folder and sampled == []


@pytest.mark.parametrize("flags, want", [
    (["--samplers", "euler"], ("euler", 2, 2.5)),
    (["--steps", "3"], ("ddim", 3, 2.5)),
    (["--guidance", "1"], ("ddim", 2, 1.0)),
    (["--samplers", "euler", "--steps", "1", "--guidance", "1.5"], ("euler", 1, 1.5)),
])
def test_each_given_axis_overrides_the_models_own(own_model, prompts, tiny_clip_config, tmp_path, sampled, flags,
                                                  want):
    report, settings, _, records, stored = _eval(own_model, prompts, tmp_path / "eval", tiny_clip_config, *SMALL,
                                                 *flags)
    assert sampled == [want]
    assert _ran(settings) == _ran(stored) == _ran(records[0]) == want
    given = {{"--samplers": "sampler", "--steps": "steps", "--guidance": "guidance"}[f] for f in flags[::2]}
    assert {k: v["from"] for k, v in report["sampling"].items()} == \
        {name: "command line" if name in given else "model" for name in OWN}


def test_a_model_without_its_own_defaults_gets_ldm_evals(tiny_sd_folder, prompts, tiny_clip_config, tmp_path,
                                                         sampled):
    assert load_pipeline(str(tiny_sd_folder), device="cpu").stage.default_settings == {}
    report, settings, folder, records, stored = _eval(tiny_sd_folder, prompts, tmp_path / "eval", tiny_clip_config,
                                                      *SMALL, "--steps", "2")
    want = (EVAL_DEFAULTS["sampler"], 2, EVAL_DEFAULTS["guidance"])
    assert want == ("euler", 2, 7.5) and sampled == [want] and folder.name == "euler-steps2-cfg7.5"
    assert _ran(settings) == _ran(stored) == _ran(records[0]) == want
    assert {k: v["from"] for k, v in report["sampling"].items()} == \
        {"sampler": "ldm-eval default", "steps": "command line", "guidance": "ldm-eval default"}


def test_a_cascade_samples_each_stage_at_its_own_defaults(tiny_clip_config, tmp_path, sampled):
    """The base's own steps / guidance / sampler and the SR stage's own steps and guidance (its sampler: the cascade's
    default), exactly what `cascade(prompt)` runs; a given axis is the common value of every stage."""
    base = stage_parts("base", steps=2, guidance=2.0, sampler="ddim")
    save_native(base, tmp_path / "base")
    save_native(stage_parts("sr", base.text_encoder, steps=1, guidance=1.0), tmp_path / "sr")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    models = [tmp_path / "base", tmp_path / "sr"]
    report, settings, folder, records, stored = _eval(models[0], prompts, tmp_path / "eval", tiny_clip_config,
                                                      upscalers=models[1:])
    per_stage = (["ddim", "dpmpp_2m"], [2, 1], [2.0, 1.0])
    assert sampled == [("ddim", 2, 2.0), ("dpmpp_2m", 1, 1.0)]
    assert folder.name == "ddim+dpmpp_2m-steps2+1-cfg2+1"
    assert _ran(settings) == _ran(stored) == _ran(records[0]) == per_stage
    assert all(v["from"] == "model" for v in report["sampling"].values())
    cascade = load_cascade(str(models[0]), [str(models[1])], device="cpu")
    sampled.clear()
    alone = np.asarray(cascade("a red circle", seed=records[0]["seed"])[0]).astype(int)
    assert sampled == [("ddim", 2, 2.0), ("dpmpp_2m", 1, 1.0)]  # the cascade's own call runs the same
    assert np.abs(alone - np.asarray(Image.open(folder / records[0]["file_name"])).astype(int)).max() <= 1

    sampled.clear()
    _, settings, folder, _, _ = _eval(models[0], prompts, tmp_path / "given", tiny_clip_config, "--steps", "1",
                                      upscalers=models[1:])
    assert sampled == [("ddim", 1, 2.0), ("dpmpp_2m", 1, 1.0)] and settings["steps"] == 1
    assert folder.name == "ddim+dpmpp_2m-steps1-cfg2+1"


@pytest.mark.parametrize("flags, message", [
    (["--samplers", "nosuch"], "nosuch"),
    (["--samplers", "ddim", "--sampler-option", "bogus=1"], "bogus"),
    (["--n-per-prompt", "0"], "--n-per-prompt"),
])
def test_a_mistake_in_the_given_flags_fails_before_the_model_loads(own_model, prompts, tmp_path, capsys, monkeypatch,
                                                                   flags, message):
    import ldm.cli.eval

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(ldm.cli.eval, "_load", no_load)  # steps and guidance are left to the model: it would load
    argv = ["--model", own_model, "--prompts", prompts, *flags, "--clip-pretrained", "none", "--out", tmp_path / "e"]
    assert main([str(a) for a in argv]) == 2
    assert message in capsys.readouterr().err
