"""Probe torch.compile (inductor) of a U-Net training step, forward and backward, on a GPU: ours and diffusers' on
the same SD-1.x-shaped network, NHWC or not, each in its own process; prints the first error of each.

    python tools/probe_train_compile.py [--full]    # --full: the SD-1.5 U-Net itself (slower to compile)

What it found is in docs/benchmarks/README.md ("torch.compile of the training step").
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.bench.models import diffusers_unet, sd15_unet  # noqa: E402
from ldm.models.unet import UNetConfig, UNetModel  # noqa: E402

VARIANTS = [("ldm", True), ("ldm", False), ("diffusers", True)]


def _probe(impl: str, channels_last: bool, full: bool, queue) -> None:
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        if full:
            unet = sd15_unet("cuda")
        else:  # SD-1.x blocks, fewer of them: the same constructs, a faster compile
            with torch.device("cuda"):
                unet = UNetModel(UNetConfig(channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1)))
        model = (unet if impl == "ldm" else diffusers_unet(unet)).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        model.compile(dynamic=False)
        x = torch.randn(4, 4, 32, 32, device="cuda")
        t = torch.randint(0, 1000, (4,), device="cuda").float()
        c = torch.randn(4, 77, 768, device="cuda")
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, t, context=c) if impl == "ldm" else model(x, t, encoder_hidden_states=c).sample
                loss = F.mse_loss(out.float(), torch.randn_like(out.float()))
            loss.backward()
        torch.cuda.synchronize()
        queue.put(f"ok in {time.perf_counter() - start:.0f} s")
    except Exception:  # noqa: BLE001  the probe reports whatever broke
        queue.put(f"FAILED after {time.perf_counter() - start:.0f} s:\n" + traceback.format_exc()[-6000:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--timeout", type=float, default=240)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    for impl, channels_last in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_probe, args=(impl, channels_last, args.full, queue))
        proc.start()
        proc.join(args.timeout)
        if proc.is_alive():
            proc.terminate()
            result = f"no answer within {args.timeout:.0f} s"
        else:
            result = queue.get() if not queue.empty() else f"exit code {proc.exitcode}"
        print(f"== {impl} channels_last={channels_last}: {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
