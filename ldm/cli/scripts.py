"""The console scripts (pyproject.toml's [project.scripts]): Ctrl-C at any moment exits 130 with one line.

A script generated for `ldm.cli.txt2img:main` imports that module, and with it torch, before the command's own handler
(`ldm.cli.common.cli_main`) exists, so a Ctrl-C in those first seconds printed Python's KeyboardInterrupt traceback.
Each function here imports its command inside the guard that also runs it, and this module imports nothing heavy: from
the first line of ldm's code on, an interrupt gives `interrupted` on stderr and exit code 130. Nothing is written while
the modules import, and the commands write every file atomically (ldm.atomic), so no half-written output is left.

`python -m ldm.cli.NAME` (and `accelerate launch -m ldm.cli.NAME`, which runs that) executes the command's module as
`__main__`, whose imports of torch came before any handler too: each command module's first lines hand over to
`run_as_main` under `if __name__ == "__main__"`, which imports the module again by its name inside the guard.
"""
from __future__ import annotations

import importlib
import sys
from typing import NoReturn

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C


def interrupted() -> int:
    """Say that the command was interrupted, in one line; returns the exit code."""
    print("interrupted", file=sys.stderr)
    return INTERRUPTED


def run(module: str) -> int:
    """Import the command `module` and return its `main()`'s exit code; a KeyboardInterrupt at any point is
    `interrupted` and 130."""
    try:
        return importlib.import_module(module).main()
    except KeyboardInterrupt:
        return interrupted()


def run_as_main(module: str) -> NoReturn:
    """`python -m module`: run the command as its console script does (`run`) and exit with its code, before the
    `__main__` copy of the module imports anything heavy."""
    sys.exit(run(module))


def ldm_txt2img() -> int:
    return run("ldm.cli.txt2img")


def ldm_convert() -> int:
    return run("ldm.cli.convert")


def ldm_eval() -> int:
    return run("ldm.cli.eval")


def ldm_fid() -> int:
    return run("ldm.cli.fid")


def ldm_demo() -> int:
    return run("ldm.cli.demo")
