"""Hostile input to ldm-txt2img and ldm-convert: non-finite numbers, huge sizes, bad output paths, non-UTF-8 files,
killed runs and odd prompts each get an `error:` line and exit 2 before any work, or a folder that stays consistent."""
import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import patch_everywhere, run_cli, write_tiny_sd

from ldm.cli import convert, fid, txt2img
from ldm.cli.common import cli_main, finite_float
from ldm.errors import LdmError
from ldm.pipeline import load_pipeline
from ldm.pipeline.generate import generate_to_folder
from ldm.pipeline.generate import slug as _slug
from ldm.pipeline.memory import estimate_generation_bytes
from ldm.textfiles import read_text

TINY = ["--steps", "2", "--height", "16", "--width", "16", "--sampler", "euler"]
BINARY = b"a red cube\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    """(model folder, loaded pipeline) of the tiny random model."""
    folder = write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")
    return folder, load_pipeline(folder, device="cpu")


@pytest.fixture
def model_dir(tiny_pipe):
    return tiny_pipe[0]


@pytest.fixture
def pipe(tiny_pipe):
    return tiny_pipe[1]


def _no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the check under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    patch_everywhere(monkeypatch, "ldm.pipeline.load.load_pipeline", refuse)


# 1. non-finite numbers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_finite_float_refuses_nan_and_infinities(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
        finite_float(text)
    assert finite_float("7.5") == 7.5


@pytest.mark.parametrize("option", ["--guidance", "--guidance-rescale", "--strength"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_txt2img_non_finite_float_options_exit_2_before_loading(option, value, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    code, err = run_cli(txt2img.main, ["a cat", option, value, *TINY, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert f"argument {option}: {value!r} is not a finite number" in err
    assert not (tmp_path / "out").exists()


def test_a_device_name_torch_does_not_know_exits_2_in_txt2img_and_fid(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    code, err = run_cli(txt2img.main, ["a cat", "--device", "gpu", *TINY, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--device 'gpu' is not a device; use cpu, cuda or cuda:N" in err, err
    assert not (tmp_path / "out").exists()
    stats = tmp_path / "s.npz"
    np.savez(stats, mu=np.zeros(2), sigma=np.eye(2))
    code, err = run_cli(fid.main, [stats, stats, "--device", "gpu"], capsys)
    assert code == 2 and "--device 'gpu' is not a device" in err, err


def test_pipeline_refuses_non_finite_guidance_from_python(pipe):
    with pytest.raises(LdmError, match="--guidance must be a finite number"):
        pipe("a cat", steps=2, height=16, width=16, guidance=float("nan"))
    with pytest.raises(LdmError, match="--guidance-rescale must be a finite number"):
        pipe("a cat", steps=2, height=16, width=16, guidance_rescale=float("inf"))


GUIDANCE_RULE = "a guidance scale is 0 or more, and the smallest meaningful values are 0 and 1"


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "-7.5"], f"--guidance -7.5 is negative: {GUIDANCE_RULE}"),
    (["--guidance=-1"], f"--guidance -1 is negative: {GUIDANCE_RULE}"),
    (["--stage-guidance", "7,-1"], f"--stage-guidance -1 is negative: {GUIDANCE_RULE}"),
    (["--stage-guidance", "nan,4"], "--stage-guidance must be a finite number, got nan"),
    # without --sampler the sampler is the model's own, known only once it loads: the value is checked before that
    (["--sampler-option", "eta=-1"], r"sampler option eta=-1 is out of range: eta lies in [0, inf), the amount of "
                                     "fresh noise per step"),
    (["--sampler", "ddim", "--sampler-option", "eta=-1"], "sampler option eta=-1 is out of range"),
    (["--sampler", "heun", "--sampler-option", "s_churn=-2"], "sampler option s_churn=-2 is out of range"),
    (["--sampler-option", "s_noise=-1"], "sampler option s_noise=-1 is out of range"),
    (["--sampler-option", "s_tmin=3", "--sampler-option", "s_tmax=1"], "sampler options s_tmin=3 > s_tmax=1"),
    (["--sampler-option", "r=1.5"], "sampler option r=1.5 is out of range: r lies in (0, 1)"),
], ids=["guidance", "guidance-equals", "stage-guidance", "stage-guidance-nan", "eta", "ddim-eta", "s_churn",
        "s_noise", "churn-window", "r"])
def test_negative_guidance_and_meaningless_sampler_options_exit_2_before_loading(argv, message, tmp_path, capsys,
                                                                                  monkeypatch):
    _no_model_load(monkeypatch)
    code, err = run_cli(txt2img.main, ["a cat", *argv, "--steps", "2", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith(f"error: {message}") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_seed_outside_a_generators_range_exits_2_before_loading(model_dir, pipe, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    top = 2**64 - 1  # the largest seed torch.Generator takes: fine alone, but prompt 2 would use top + 1
    for argv, message in ((["a cat", "--seed", str(2**70)], "is out of range: a seed lies in"),
                          (["--prompts", prompts, "--seed", str(top)], f"with 2 prompts it is at most {top - 1}"),
                          (["a cat", "--seed", str(-2**63 - 1)], "is out of range")):
        code, err = run_cli(txt2img.main, [*argv, "--model", model_dir, *TINY, "--out", tmp_path / "out"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
    with pytest.raises(LdmError, match=r"with 2 prompts it is at most"):  # the library's door says the same
        generate_to_folder(pipe, ["a cat", "a dog"], tmp_path / "out", seed=top, steps=1, progress=False)
    with pytest.raises(LdmError, match="--seed must be an integer, got 1.5"):
        pipe("a cat", steps=2, height=16, width=16, seed=1.5)
    assert len(pipe("a cat", steps=1, height=16, width=16, seed=top)) == 1  # the range's ends still work


# 2. memory -------------------------------------------------------------------------------------------------------


def test_memory_estimate_grows_with_area_and_batch_and_halves_in_fp16(pipe):
    def est(h, w, n=1, dtype=torch.float32, guidance=True):
        return estimate_generation_bytes(pipe.unet.config, pipe.autoencoder.config, height=h, width=w, n=n,
                                         guidance=guidance, dtype=dtype, device_type="cuda")

    base = est(256, 256)
    assert est(512, 512) == pytest.approx(4 * base, rel=0.05)  # activations are linear in the pixel count
    assert est(256, 256, n=4) == pytest.approx(4 * base, rel=1e-9)
    assert est(256, 256, dtype=torch.float16) < 0.75 * base
    assert est(256, 256, guidance=False) < base
    # 100000 x 100000 (the size that was OOM-killed at 22.5 GB): terabytes, refused on any machine
    assert est(100000, 100000) > 2**40


def test_memory_estimate_counts_quadratic_attention_scores_for_the_math_backend(pipe):
    kw = {"height": 512, "width": 512, "n": 1, "guidance": True, "dtype": torch.float32, "device_type": "cuda"}
    sdpa = estimate_generation_bytes(pipe.unet.config, pipe.autoencoder.config, **kw, attention_backend="sdpa")
    math = estimate_generation_bytes(pipe.unet.config, pipe.autoencoder.config, **kw, attention_backend="math")
    tokens = (512 // 2 // 2) ** 2  # the tiny U-Net attends at its second level, the autoencoder's factor is 2
    assert math - sdpa >= 2 * 2 * 2 * tokens**2 * 4 * 0.99  # batch 2 (CFG) x 2 heads x scores and softmax, fp32
    # On the CPU even SDPA materialises the autoencoder's single-head scores over the latent pixels (measured).
    kw["device_type"] = "cpu"
    cpu = estimate_generation_bytes(pipe.unet.config, pipe.autoencoder.config, **kw, attention_backend="sdpa")
    assert cpu >= 2 * (512 // 2) ** 4 * 4


def test_huge_size_is_refused_with_estimate_and_available_memory(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(txt2img.main, ["a cat", "--model", model_dir, "--steps", "2", "--height", "100000",
                                    "--width", "100000", "--out", out], capsys)
    assert code == 2, err
    assert "generating 1 image(s) of 100000x100000 needs about" in err and "GiB is available" in err
    assert not out.exists() or not any(out.iterdir())


def test_size_that_does_not_fit_the_available_memory_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ldm.pipeline.generate.available_bytes", lambda device: 2**20)  # 1 MiB free
    code, err = run_cli(txt2img.main, ["a cat", "--model", model_dir, *TINY, "--n", "8", "--out", tmp_path / "o"],
                     capsys)
    assert code == 2 and "8 image(s) of 16x16" in err and "only 0.0 GiB is available" in err


def test_out_of_memory_during_generation_names_size_and_batch(pipe, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(type(pipe), "__call__", oom)
    with pytest.raises(LdmError, match=r"out of cpu memory generating 3 image\(s\) of 16x16 \(prompt 1 of 1\)"):
        generate_to_folder(pipe, ["a cat"], tmp_path / "out", steps=2, height=16, width=16, n_per_prompt=3,
                           progress=False)


# 3. output paths -------------------------------------------------------------------------------------------------


def test_txt2img_out_that_is_a_file_or_under_a_file_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    existing = tmp_path / "existing_file.txt"
    existing.write_text("keep me")
    code, err = run_cli(txt2img.main, ["a cat", *TINY, "--out", existing], capsys)
    assert code == 2 and f"--out {existing} is a file, not a folder" in err
    code, err = run_cli(txt2img.main, ["a cat", *TINY, "--out", existing / "sub"], capsys)
    assert code == 2 and f"{existing} is a file, so no folder can be made there" in err
    assert existing.read_text() == "keep me"


def test_txt2img_out_without_write_permission_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    locked = tmp_path / "ro_dir"
    locked.mkdir()
    real_access = os.access
    # As root a chmod-ed folder stays writable, so the permission answer is simulated where the code asks it.
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == str(locked) else real_access(p, mode))
    code, err = run_cli(txt2img.main, ["a cat", *TINY, "--out", locked / "out"], capsys)
    assert code == 2 and f"no permission to write in {locked}" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a read-only folder")
def test_txt2img_out_in_a_read_only_folder_exits_2(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    locked = tmp_path / "ro_dir"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = run_cli(txt2img.main, ["a cat", *TINY, "--out", locked], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2 and "no permission to write" in err


def test_convert_destination_of_the_wrong_kind_or_under_a_file_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("SRC was loaded before DST was checked")

    patch_everywhere(monkeypatch, "ldm.io.formats.load_model", refuse)
    existing = tmp_path / "existing_file"
    existing.write_text("keep me")
    code, err = run_cli(convert.main, ["src", existing, "--to", "native", "--overwrite"], capsys)
    assert code == 2 and f"DST {existing} is a file but a folder is written there" in err
    assert existing.read_text() == "keep me"
    code, err = run_cli(convert.main, ["src", existing / "x", "--to", "native"], capsys)
    assert code == 2 and "is a file, so no folder can be made there" in err
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    code, err = run_cli(convert.main, ["src", folder, "--to", "original", "--overwrite"], capsys)
    assert code == 2 and "is a folder but a file is written there" in err
    code, err = run_cli(convert.main, ["src", folder, "--to", "original"], capsys)
    assert code == 2 and "exists; pass --overwrite" in err


def test_convert_goes_through_the_shared_error_door(monkeypatch, capsys):
    assert convert.main.__wrapped__ is not None  # cli_main's functools.wraps

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "run", interrupted)
    code, err = run_cli(convert.main, ["a", "b", "--to", "native"], capsys)
    assert code == 130 and "interrupted" in err


# Ctrl-C at any moment: one line, exit 130, nothing half-written ---------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["ldm-txt2img", "ldm-convert", "ldm-eval", "ldm-fid", "ldm-demo"]
# The script pip writes for an entry point (its template, less the coding line): the import comes before any handler.
PIP_SCRIPT = """import re
import sys
from {module} import {function}
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit({function}())
"""


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: command -> 'module:function'."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def ctrl_c_at_import(module: str) -> str:
    """Code that sends this process a real SIGINT as `module` starts to import. The signal is aimed at the running
    thread, so it is delivered before pthread_kill returns and raised at the next Python call: no race, no timing."""
    return f"""
import signal, sys, threading

class CtrlCAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCAtImport())
"""


# Ctrl-C as a terminal delivers it: a suite started in the background (`nohup ... &`, some CI runners) passes
# SIGINT on ignored, and Python then installs no KeyboardInterrupt handler, so the signal would do nothing at all
INTERACTIVE_SIGINT = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
"""


def run_console_script(folder: Path, entry: str, argv: list, before: str) -> subprocess.CompletedProcess:
    """Run the script pip would write for `entry` ('module:function') in `folder`, after the code `before`."""
    module, function = entry.split(":")
    script = folder / "script.py"
    script.write_text(INTERACTIVE_SIGINT + before + PIP_SCRIPT.format(module=module, function=function))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, str(script), *map(str, argv)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_every_console_script_imports_its_command_inside_the_interrupt_guard(monkeypatch):
    from ldm.cli import scripts

    entries = console_scripts()
    assert sorted(entries) == sorted(COMMANDS)
    ran = []
    monkeypatch.setattr(scripts, "run", lambda module: ran.append(module) or 0)
    for command, entry in entries.items():
        module, function = entry.split(":")
        assert module == "ldm.cli.scripts" and getattr(scripts, function)() == 0
        assert ran[-1] == "ldm.cli." + command.removeprefix("ldm-")
        assert importlib.import_module(ran[-1]).main.__wrapped__  # and its main is cli_main's (Ctrl-C while it runs)


@pytest.mark.parametrize("at", ["command", "torch"])
@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_while_a_console_script_imports_exits_130_with_one_line(command, at, tmp_path):
    """Ctrl-C as the command's module starts to import, or in the middle (ldm.cli.common importing torch)."""
    module = "ldm.cli." + command.removeprefix("ldm-") if at == "command" else "torch"
    result = run_console_script(tmp_path, console_scripts()[command], ["--help"], ctrl_c_at_import(module))
    # --help would print the usage and exit 0 had the interrupt not come during the import
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", ""), result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["script.py"]  # nothing written


def test_without_the_guard_the_same_ctrl_c_was_a_traceback(tmp_path):
    """What the scripts were (`ldm.cli.txt2img:main`): the interrupt during `import torch` escapes as a traceback."""
    result = run_console_script(tmp_path, "ldm.cli.txt2img:main", ["--help"], ctrl_c_at_import("torch"))
    assert result.returncode == -signal.SIGINT  # Python ends itself by SIGINT after printing the traceback
    assert "Traceback" in result.stderr and result.stderr.splitlines()[-1] == "KeyboardInterrupt"


def run_module(folder: Path, module: str, argv: list, before: str) -> subprocess.CompletedProcess:
    """`python -m module argv` in `folder`, after the code `before` (run first as sitecustomize, from PYTHONPATH)."""
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(INTERACTIVE_SIGINT + before)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder / "site"), str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.parametrize("at", ["torch", "ldm.cli.common"])
@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_while_python_m_imports_a_command_exits_130_with_one_line(command, at, tmp_path):
    """`python -m ldm.cli.NAME` (and `accelerate launch -m`, which runs it so) imports the command inside the same
    guard as its console script: its module's first lines hand over to `ldm.cli.scripts.run_as_main`. It imported
    torch at its top before any handler existed, and printed a KeyboardInterrupt traceback."""
    module = "ldm.cli." + command.removeprefix("ldm-")
    result = run_module(tmp_path, module, ["--help"], ctrl_c_at_import(at))
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", ""), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # nothing written


def test_python_m_runs_the_command(tmp_path):
    """Without an interrupt `python -m ldm.cli.convert` is the command itself: its usage error and exit code 2."""
    result = run_module(tmp_path, "ldm.cli.convert", ["--to", "nowhere"], "")
    assert result.returncode == 2 and "usage: ldm-convert" in result.stderr, result.stderr


def test_ctrl_c_while_ldm_convert_writes_leaves_no_output_and_no_temporary(tmp_path):
    """The weights are in the temporary file, not yet renamed to DST, when Ctrl-C comes: DST never appears."""
    model = write_tiny_sd(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    before = """
import signal, threading
import safetensors.torch

_save_file = safetensors.torch.save_file


def save_file(*args, **kwargs):
    _save_file(*args, **kwargs)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # raised at the next Python call


safetensors.torch.save_file = save_file
"""
    result = run_console_script(out, console_scripts()["ldm-convert"], [model, out / "sd.safetensors", "--to",
                                                                       "original"], before)
    assert result.returncode == 130 and result.stderr.splitlines()[-1:] == ["interrupted"], result.stderr
    assert "Traceback" not in result.stderr and "wrote" not in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["script.py"]  # no sd.safetensors, no hidden .sd.safetensors.*


# 4. text that is not UTF-8 ---------------------------------------------------------------------------------------


def test_read_text_names_file_line_and_column(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first\nsecond ok\nthird \xff here\n")
    with pytest.raises(LdmError, match=r"prompts.txt:3: --prompts file is not UTF-8 text \(byte 0xff at column 7\)"):
        read_text(path, "--prompts file")
    path.write_bytes(b"\xef\xbb\xbfa cat\n")  # a Windows editor's byte-order mark is not part of the prompt
    assert read_text(path) == "a cat\n"


def test_txt2img_binary_prompts_file_exits_2_naming_file_and_line(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(BINARY)
    code, err = run_cli(txt2img.main, ["--prompts", prompts, *TINY, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"{prompts}:2: --prompts file is a binary file, not text" in err


def test_binary_config_yaml_in_a_model_folder_exits_2_in_txt2img_and_convert(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.yaml").write_bytes(b"unet:\n  x: 1\n" + BINARY)
    code, err = run_cli(txt2img.main, ["a cat", "--model", broken, *TINY, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"{broken / 'config.yaml'}:4: config file is a binary file" in err
    code, err = run_cli(convert.main, [broken, tmp_path / "converted", "--to", "native"], capsys)
    assert code == 2 and f"{broken / 'config.yaml'}:4:" in err
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("content, message", [
    (b'{"file_name": "00000-a.png", "text": "a"}\n\xff\xfe\n', ":2: metadata.jsonl is not UTF-8 text"),
    (b'{"file_name": "00000-a.png", "text": "a"}\n{"file_name": \n', ":2: metadata.jsonl line is not valid JSON"),
    (b'{"file_name": "00000-a.png", "text": "a"}\n[1, 2]\n', ':2: not a record with a "file_name"'),
])
def test_broken_metadata_in_out_exits_2_before_generating(model_dir, tmp_path, capsys, content, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metadata.jsonl").write_bytes(content)
    code, err = run_cli(txt2img.main, ["a cat", "--model", model_dir, *TINY, "--out", out], capsys)
    assert code == 2 and f"{out / 'metadata.jsonl'}{message}" in err
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl"]  # nothing generated, nothing rewritten
    assert (out / "metadata.jsonl").read_bytes() == content


# Also fix: killed runs, re-runs, file names ---------------------------------------------------------------------


def test_a_killed_runs_temporaries_are_removed_and_its_unlisted_images_indexed(pipe, tmp_path):
    out = tmp_path / "out"
    first = generate_to_folder(pipe, ["a red circle"], out, steps=2, height=16, width=16, n_per_prompt=2,
                               progress=False)
    # Simulate a kill: the second prompt's first PNG was renamed into place, its second one was mid-write
    # (a hidden temporary folder holding a 0-byte PNG), and metadata.jsonl was never updated.
    index = (out / "metadata.jsonl").read_text()
    generate_to_folder(pipe, ["a blue square"], out, steps=2, height=16, width=16, n_per_prompt=1, progress=False)
    (out / "metadata.jsonl").write_text(index)
    tmp = out / ".00003-a-blue-square.png.k3j4ab_9.tmp"
    tmp.mkdir()
    (tmp / "00003-a-blue-square.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="listed 1 image"):
        again = generate_to_folder(pipe, ["a green cube"], out, steps=2, height=16, width=16, progress=False)
    assert not tmp.exists()
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    names = [r["file_name"] for r in records]
    assert names == [r["file_name"] for r in first] + ["00002-a-blue-square.png", "00003-a-green-cube.png"]
    assert again[0]["file_name"] == "00003-a-green-cube.png"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)  # every PNG named by exactly one line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_file_names_stay_unique_after_lines_were_removed_by_hand(pipe, tmp_path):
    out = tmp_path / "out"
    generate_to_folder(pipe, ["a", "b"], out, steps=2, height=16, width=16, progress=False)
    lines = (out / "metadata.jsonl").read_text().splitlines()
    (out / "metadata.jsonl").write_text(lines[1] + "\n")  # the user dropped line 0 but left 00000-a.png on disk
    with pytest.warns(UserWarning, match="listed 1 image"):  # the PNG carries its record: it is listed again
        new = generate_to_folder(pipe, ["b"], out, steps=2, height=16, width=16, progress=False)
    assert new[0]["file_name"] == "00002-b.png"  # not a second 00001-
    names = [json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert names == ["00001-b.png", "00000-a.png", "00002-b.png"]


@pytest.mark.parametrize("prompt, name", [
    ("A cat, on a MAT!", "a-cat-on-a-mat"),
    ("", "unconditional"),
    ("   ", "unconditional"),
    ("🐱🎩", None),
    ("猫", None),
])
def test_slug_names_a_prompt_without_ascii_by_its_hash(prompt, name):
    slug = _slug(prompt)
    if name is not None:
        assert slug == name
    else:
        assert slug.startswith("prompt-") and len(slug) == len("prompt-") + 12
        assert slug != _slug(prompt + "🐶")  # different prompts, different names
        assert slug == _slug(prompt)


def test_slug_truncation_leaves_no_trailing_dash():
    assert not _slug("a" * 39 + " b c d").endswith("-")


def test_warnings_from_a_command_are_one_line(capsys):
    import warnings

    @cli_main
    def main(argv):
        warnings.warn("something to know")

    assert main(None) == 0  # as a console script (argv None): one `warning:` line, no source dump
    assert capsys.readouterr().err == "warning: something to know\n"


def test_a_full_disk_or_read_only_folder_anywhere_is_one_error_line(capsys):
    import errno

    from safetensors import SafetensorError

    for raised, reason in ((OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
                           (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
                           (SafetensorError("Error while serializing: I/O error: No space left on device (os error "
                                            "28)"), "no space left on device")):
        @cli_main
        def main(argv):
            raise raised

        assert main([]) == 2
        assert capsys.readouterr().err.startswith(f"error: {reason} (")

    @cli_main
    def bug(argv):
        raise RuntimeError("a bug")  # anything else is still a traceback

    with pytest.raises(RuntimeError, match="a bug"):
        bug([])


def test_sixteen_bit_init_image_is_rescaled_not_clipped():
    import numpy as np

    from ldm.pipeline.images import from_pil

    grey = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    pixels = from_pil(Image.fromarray(grey))  # I;16
    expected = torch.from_numpy(np.arange(256, dtype=np.float32).reshape(16, 16) / 127.5 - 1.0)
    assert torch.allclose(pixels[0, 0], expected, atol=1e-6) and torch.equal(pixels[0, 0], pixels[0, 2])


def test_error_is_handed_to_the_launchers_failure_summary(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    @cli_main
    def main(argv):
        raise LdmError("folder: no images found")

    assert main([]) == 2
    assert capsys.readouterr().err == "error: folder: no images found\n"
    assert json.loads(error_file.read_text())["message"] == "error: folder: no images found"


@pytest.mark.slow
def test_under_torchrun_the_error_line_ends_the_output(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "ldm.cli.fid", "empty", "empty"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                            timeout=300)
    assert result.returncode == 1  # the launcher's own code, whatever the children's (2 here)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("=")]
    assert "exitcode  : 2" in result.stderr
    from ldm.eval.imagefolder import IMAGE_EXTENSIONS
    assert lines[-1].strip() == (f"traceback : error: empty: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}; "
                                 "use --recursive for subfolders)")
