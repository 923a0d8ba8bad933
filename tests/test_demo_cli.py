"""ldm-demo's door and the page's generation without a browser: the missing extra, a model that does not load, the
defaults it serves with, the cascade settings of the page against ldm-txt2img's flags, and the empty-prompt rule."""
import json
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli, write_tiny_sd

from ldm.cli import demo, demo_page, txt2img
from ldm.config import from_dict, load_yaml
from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import LdmError
from ldm.io.components import ModelParts, config_sections
from ldm.io.native_format import save_native
from ldm.io.part_types import build_part, read_section
from ldm.pipeline.generate import generate_to_folder
from ldm.pipeline.load import load_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


def test_without_gradio_it_says_how_to_install_and_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    code, err = run_cli(demo.main, ["--model", "/no/such/model"], capsys)
    assert code == 2 and "pip install -e '.[demo]'" in err
    assert "/no/such/model" not in err  # said before any model is read


def test_a_model_that_does_not_load_stops_start_up_with_the_clis_error(monkeypatch, tmp_path, capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    monkeypatch.setattr(demo, "launch", lambda *a, **k: pytest.fail("a page was served for a broken model"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("unet: [not, a, section]\n")
    for model in (tmp_path / "missing", broken):
        _, cli_err = run_cli(txt2img.main, ["a cat", "--model", model, "--out", tmp_path / "out"], capsys)
        code, err = run_cli(demo.main, ["--model", model], capsys)
        cli_error = [line for line in cli_err.splitlines() if line.startswith("error: ")]
        assert code == 2 and cli_error and cli_error == [line for line in err.splitlines() if line.startswith("error:")]


def test_a_port_out_of_range_is_an_argument_error_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_model", lambda args: pytest.fail("the model was loaded for an impossible port"))
    for port, message in (("70000", "70000 is not a port (1-65535)"), ("-1", "-1 is not a port"),
                          ("http", "'http' is not a port number")):
        code, err = run_cli(demo.main, ["--port", port], capsys)
        assert code == 2 and f"argument --port: {message}" in err, err


def test_it_serves_on_127_0_0_1_without_a_share_link_by_default(monkeypatch, model, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    served = {}
    monkeypatch.setattr(demo, "launch", lambda page, **kw: served.update(kw, page=page))
    images = tmp_path / "images"
    monkeypatch.setattr(demo, "output_root", lambda: images.mkdir() or images)
    handler = signal.getsignal(signal.SIGTERM)
    assert demo.main(["--model", str(model), "--device", "cpu"]) == 0
    assert not images.exists() and signal.getsignal(signal.SIGTERM) is handler  # tidied when the server stops
    assert {k: served[k] for k in ("host", "port", "share")} == {"host": "127.0.0.1", "port": 7860, "share": False}
    assert served["page"].analytics_enabled is False
    assert demo.main(["--model", str(model), "--device", "cpu", "--share", "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert {k: served[k] for k in ("host", "port", "share")} == {"host": "0.0.0.0", "port": 7999, "share": True}


def test_a_port_in_use_is_an_error_naming_it(model, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra is not installed")
    page = demo_page.build_page(demo_page.Generator(load_pipeline(model, device="cpu"), tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LdmError, match=f"127.0.0.1:{port}.*choose another --port"):
            demo_page.launch(page, port=port, block=False)


def _stage(name: str, text_encoder=None) -> ModelParts:
    """A random tiny Imagen stage of configs/imagen-tiny-NAME.yaml (sharing `text_encoder` when given)."""
    raw = load_yaml(CONFIGS / f"imagen-tiny-{name}.yaml")["model"]
    configs = {role: read_section(role, raw[role]) for role in ("unet", "text_encoder")}
    unet = build_part(configs["unet"])
    with torch.no_grad():  # zero-initialised output layers would make every image the same
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)
    schedule = from_dict(ScheduleConfig, raw["schedule"])
    return ModelParts(unet=unet, text_encoder=text_encoder or build_part(configs["text_encoder"]), schedule=schedule,
                      config={**config_sections(configs, schedule), "stage": raw["stage"]})


@pytest.mark.slow
def test_cascade_stage_steps_and_aug_level_from_the_page_equal_the_cli_flags(tmp_path):
    torch.manual_seed(0)
    base = _stage("base")
    save_native(base, tmp_path / "base")
    save_native(_stage("sr", base.text_encoder), tmp_path / "sr")
    flags = ["--seed", "4", "--sampler", "ddim", "--guidance", "3", "--steps", "3"]
    out = tmp_path / "cli"
    assert txt2img.main(["a red apple", "--model", str(tmp_path / "base"), "--upscaler", str(tmp_path / "sr"),
                         "--device", "cpu", "--out", str(out), *flags, "--stage-steps", "3,2", "--aug-level", "0.3"]) == 0
    args = demo.build_parser().parse_args(["--model", str(tmp_path / "base"), "--upscaler", str(tmp_path / "sr"),
                                           "--device", "cpu"])
    generator = demo_page.Generator(demo.load_model(args), tmp_path / "page")
    assert generator.stage_count == 2
    (path, record), = generator.generate("a red apple", seed=4, sampler="ddim", guidance=3.0, steps=3,
                                         stage_steps=[None, 2], aug_level=0.3)
    (cli_path,) = out.glob("*.png")
    assert [s["steps"] for s in record["stages"]] == [3, 2] and record["stages"][1]["aug_level"] == 0.3
    assert path.read_bytes() == cli_path.read_bytes()
    assert generator.pipe.options["aug_level"] is None  # the request's settings did not stick to the server's model
    with pytest.raises(LdmError, match="--aug-level must lie in"):
        generator.generate("a red apple", steps=2, aug_level=1.5)


def test_stage_settings_without_a_cascade_say_how_to_get_one(model, tmp_path):
    generator = demo_page.Generator(load_pipeline(model, device="cpu"), tmp_path)
    with pytest.raises(LdmError, match="start ldm-demo with --upscaler"):
        generator.generate("a cat", steps=2, stage_steps=[3])


def test_an_empty_prompt_with_guidance_is_refused_by_every_door(model, tmp_path, capsys):
    pipe = load_pipeline(model, device="cpu")
    small = dict(steps=1, height=16, width=16, progress=False)
    with pytest.raises(LdmError, match="empty prompt and no negative prompt: guidance has nothing to steer by"):
        generate_to_folder(pipe, ["a cat", ""], tmp_path / "refused", guidance=7.5, **small)
    assert not (tmp_path / "refused").exists()
    code, err = run_cli(txt2img.main, ["", "--model", model, "--out", tmp_path / "cli"], capsys)
    assert code == 2 and "give a prompt, or --guidance 1 for an unconditional image" in err
    # Unconditional (guidance 1), or steered away from a negative prompt: both are meaningful and run.
    (unconditional,) = generate_to_folder(pipe, [""], tmp_path / "ok", guidance=1.0, **small)
    (steered,) = generate_to_folder(pipe, [""], tmp_path / "ok", guidance=7.5, negative_prompt="red", **small)
    a, b = (np.asarray(Image.open(tmp_path / "ok" / r["file_name"]), dtype=float) for r in (unconditional, steered))
    assert np.abs(a - b).max() > 0


def test_blank_boxes_are_the_models_own_defaults_as_the_flags_left_out(model, tmp_path, capsys):
    """A blank guidance (or steps, sampler) box used to reach the empty-prompt check as None (a TypeError)."""
    generator = demo_page.Generator(load_pipeline(model, device="cpu"), tmp_path / "page")
    ((path, record),) = generator.generate("a cat", seed=3, height=16, width=16)
    code, _ = run_cli(txt2img.main, ["a cat", "--model", model, "--seed", "3", "--height", "16", "--width", "16",
                                     "--out", tmp_path / "cli"], capsys)
    (cli_record,) = [json.loads(line) for line in (tmp_path / "cli" / "metadata.jsonl").read_text().splitlines()]
    assert code == 0 and path.exists()
    for key in ("sampler", "steps", "guidance", "seed"):
        assert record[key] == cli_record[key], key
    a = np.asarray(Image.open(path), dtype=float)
    b = np.asarray(Image.open(tmp_path / "cli" / cli_record["file_name"]), dtype=float)
    assert np.array_equal(a, b)


def test_the_sigma_schedule_from_the_page_is_the_clis_and_recorded(model, tmp_path, capsys):
    generator = demo_page.Generator(load_pipeline(model, device="cpu"), tmp_path / "page")
    ((path, record),) = generator.generate("a cat", seed=3, sampler="euler", steps=4, height=16, width=16,
                                           sigmas="exponential")
    code, err = run_cli(txt2img.main, ["a cat", "--model", model, "--seed", "3", "--sampler", "euler", "--steps", "4",
                                       "--height", "16", "--width", "16", "--sigmas", "exponential",
                                       "--out", tmp_path / "cli"], capsys)
    assert code == 0, err
    (cli_record,) = [json.loads(line) for line in (tmp_path / "cli" / "metadata.jsonl").read_text().splitlines()]
    assert record["sigmas"] == cli_record["sigmas"] == "exponential"
    assert {k: v for k, v in record.items() if k != "file_name"} == \
        {k: v for k, v in cli_record.items() if k != "file_name"}
    a = np.asarray(Image.open(path), dtype=float)
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "cli" / cli_record["file_name"]), dtype=float))
    assert "(exponential sigmas)" in demo_page.caption(record)
    ((plain_path, plain),) = generator.generate("a cat", seed=3, sampler="euler", steps=4, height=16, width=16,
                                                sigmas=None)  # a cleared dropdown: the model's own schedule
    assert plain["sigmas"] == "model" and not np.array_equal(a, np.asarray(Image.open(plain_path), dtype=float))


def test_a_sampler_without_the_sigma_schedule_is_the_clis_refusal_not_a_crash(model, tmp_path, capsys):
    code, err = run_cli(txt2img.main, ["a cat", "--model", model, "--sampler", "ddim", "--sigmas", "karras",
                                       "--out", tmp_path / "cli"], capsys)
    (cli_line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    generator = demo_page.Generator(load_pipeline(model, device="cpu"), tmp_path / "page")
    with pytest.raises(LdmError) as refused:
        generator.generate("a cat", sampler="ddim", steps=2, height=16, width=16, sigmas="karras")
    assert code == 2 and cli_line == f"error: {refused.value}" and "the samplers that take it are euler" in cli_line
