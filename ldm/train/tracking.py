"""Run logs: scalars and sample grids to TensorBoard (default) or Weights & Biases through accelerate's trackers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.atomic import atomic_path
from ldm.errors import LdmError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_name(log_with: str) -> str | None:
    """The accelerate tracker for `log_with` ("none" -> None), or an LdmError naming the package to install."""
    if log_with == "none":
        return None
    package = TRACKER_PACKAGES[log_with]
    if importlib.util.find_spec(package) is None:
        raise LdmError(f"log_with={log_with} needs the {package!r} package: pip install {package} (or log_with=none)")
    return log_with


class RunLogger:
    """Thin layer over `accelerator.log`: scalars every `log_every` steps, images to the tracker and DIR/samples/."""

    def __init__(self, accelerator, log_with: str, output_dir: Path, run_name: str = "ldm-train"):
        self.accelerator = accelerator
        self.enabled = log_with != "none"
        self.samples_dir = Path(output_dir) / "samples"
        if self.enabled:
            accelerator.init_trackers(run_name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log numbers (main process only; accelerate skips the others)."""
        if self.enabled:
            self.accelerator.log({k: float(v) for k, v in values.items()}, step=step)

    def grid(self, name: str, grid: Image.Image, step: int) -> Path | None:
        """Save `DIR/samples/<name>-<step>.png` atomically and send the grid to the trackers; main process only."""
        if not self.accelerator.is_main_process:
            return None
        path = self.samples_dir / f"{name}-{step:06d}.png"
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        if self.enabled:
            array = np.asarray(grid.convert("RGB"))
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
                else:
                    tracker.log_images({name: [grid]}, step=step)
        return path

    def close(self) -> None:
        if self.enabled:
            self.accelerator.end_training()
