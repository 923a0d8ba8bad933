"""What every command-line door shares: user errors become one line on stderr and exit code 2.

Exit codes: 0 success, 1 a bug (a traceback: please report it), 2 a problem with the input that the message
explains (argparse's own errors included), 130 interrupted (Ctrl-C; during the imports, before `cli_main` runs, the
console scripts of ldm.cli.scripts say it alike). docs/reliability.md has the details, and what `accelerate launch` /
torchrun add.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from typing import Callable

import torch

from ldm.cli.scripts import interrupted
from ldm.diffusion.sampler_registry import check_option_values
from ldm.diffusion.schedules import NETWORK_PREDICTIONS, PREDICTION_ALIASES
from ldm.errors import LdmError, write_failure


def finite_float(text: str) -> float:
    """An argparse `type=` for float options: NaN and infinities are refused before any work is done."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def layer_count(text: str) -> int:
    """An argparse `type=` for `--clip-skip`: a whole number, 0 or more, refused before the model loads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of layers") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give 0 or more layers to leave out (A1111's "
                                         "'Clip skip 2' is --clip-skip 1)")
    return value


def finite_floats(texts: list[str], option: str) -> list[float]:
    """Every number of a list option (`--guidance 1 3,7.5`), finite, or an LdmError naming the option."""
    values = []
    for item in texts:
        for text in filter(None, item.split(",")):
            try:
                values.append(finite_float(text))
            except argparse.ArgumentTypeError as e:
                raise LdmError(f"{option}: {e}") from None
    return values


def parse_sampler_options(pairs: list[str]) -> dict[str, float]:
    """`--sampler-option NAME=VALUE` arguments -> {NAME: float(VALUE)}, each value finite and inside its option's range
    (`eta=-1` is refused here, before the model and so the sampler are known)."""
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not name.strip() or number is None:
            raise LdmError(f"--sampler-option {pair!r}: write NAME=VALUE with a number, e.g. eta=0.5")
        options[name.strip()] = number
    check_option_values(options)
    return options


def prediction_type(text: str) -> str:
    """An argparse `type=` for `--prediction-type`: diffusers' name of it (eps / v / x0 accepted), refused before
    the model loads."""
    name = PREDICTION_ALIASES.get(text, text)
    if name not in NETWORK_PREDICTIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(NETWORK_PREDICTIONS)} "
                                         f"(or {', '.join(PREDICTION_ALIASES)})")
    return name


def original_yaml(text: str) -> str:
    """An argparse `type=` for `--config`: an existing file, refused before the model loads."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file" + (" (it is a folder)" if os.path.isdir(text) else "")
                                         + "; give the original YAML (e.g. v2-inference-v.yaml) as a file path")
    return text


def add_single_file_options(p: argparse.ArgumentParser, model: str) -> None:
    """`--config`, `--prediction-type` and `--no-ema`: what a single-file checkpoint's weights cannot say, or hold
    twice (ldm-txt2img, ldm-convert, ldm-eval, ldm-demo); `model` names the argument they describe."""
    p.add_argument("--config", type=original_yaml, help=f"original-layout YAML describing a single-file {model} (e.g. "
                   "v2-inference-v.yaml; default: a <name>.yaml beside the file, else the architecture read from "
                   "the tensor shapes)")
    p.add_argument("--prediction-type", type=prediction_type,
                   help="epsilon | v_prediction | sample, or eps | v | x0 (SD-2 768-v models: v); default: the YAML's; "
                   "without one, SD-1 files are eps and SD-2 files are read as the file's header, its global_step "
                   "(diffusers' rule) or its U-Net on a test input say (README: Models and weights)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help=f"a single-file {model} holding both U-Net weight sets: use the non-EMA ones, as diffusers' "
                   "from_single_file and A1111 do (default: the EMA ones, as CompVis' scripts do)")


def launched_accelerator(device: str | None):
    """An accelerate.Accelerator when launched on several processes (one GPU each, or gloo on CPUs), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings from library code as one `warning: ...` line, not Python's two-line source dump."""
    print(f"warning: {message}", file=file or sys.stderr)


def _tell_launcher(message: str) -> None:
    """Under torchrun / multi-GPU `accelerate launch`, hand the message to the launcher's failure summary.

    The launcher ends with a report per failed process; the error file it names is where that report takes its
    text from, so the `error:` line is repeated there, as the last thing on the screen, instead of a hint to
    enable tracebacks.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the message was printed already; the summary is a courtesy


def cli_main(func: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a `main(argv)` so that an LdmError prints `error: ...` and returns 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(argv: list[str] | None = None) -> int:
        with warnings.catch_warnings():
            if argv is None:  # run as a command (called from Python, e.g. by tests, warnings stay as they are)
                warnings.showwarning = _show_warning
            try:
                return int(func(argv) or 0)
            except LdmError as e:
                print(f"error: {e}", file=sys.stderr)
                _tell_launcher(f"error: {e}")
                return e.exit_code
            except KeyboardInterrupt:
                return interrupted()
            except Exception as e:  # a full disk or a read-only folder found while writing: one line, not a traceback
                if write_failure(e) is None:
                    raise
                message = (f"error: {write_failure(e)} ({e}); free space, or fix the folder's or file's "
                           "permissions or mount")
                print(message, file=sys.stderr)
                _tell_launcher(message)
                return 2

    return wrapper
