"""Time the bundled default model on this machine's CPU: import, load, and one 25-step guided image (warm process).

    python tools/time_default_model.py [--runs 3] [--upscaler]

Prints the numbers docs/default-model.md records (its budgets: 1.5 s per image, 1 s to load); with --upscaler also
the bundled 64 -> 256 stage at its own defaults (docs/imagen.md): the upscale of a 64 px image alone, and the whole
cascade. A report, not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

PROMPTS = ["an emoji of a yellow heart, noto emoji style", "an emoji of a smiling face with sunglasses, twemoji style",
           "an emoji of a blue circle, openmoji style"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="timed images after one warm-up")
    p.add_argument("--upscaler", action="store_true", help="also time `--upscaler default` (the bundled SR stage)")
    args = p.parse_args()
    start, start_cpu = time.perf_counter(), time.process_time()
    import torch

    from ldm import load_pipeline
    imported, imported_cpu = time.perf_counter(), time.process_time()
    pipe = load_pipeline(device="cpu")
    loaded, loaded_cpu = time.perf_counter(), time.process_time()
    cold = sorted(m for m in ("open_clip", "torchvision", "transformers") if m in sys.modules)
    pipe("an emoji of a red apple, twemoji style", steps=25, guidance=5, seed=0)  # warm-up
    times = []
    for i in range(args.runs):
        t = time.perf_counter()
        pipe(PROMPTS[i % len(PROMPTS)], steps=25, guidance=5, seed=i)
        times.append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # CPU seconds beside wall seconds: on a shared machine the wall clock also counts other people's work
    print(f"import ldm + torch: {imported - start:.2f} s ({imported_cpu - start_cpu:.2f} s CPU)")
    print(f"load_pipeline(): {loaded - imported:.2f} s ({loaded_cpu - imported_cpu:.2f} s CPU); "
          f"heavy imports it made: {cold or 'none'}")
    print(f"one image (25 steps, guidance 5): median {statistics.median(times):.3f} s over {args.runs}")
    if args.upscaler:
        time_upscaler(pipe, args.runs)


def time_upscaler(base, runs: int) -> None:
    """The bundled SR stage at its own defaults (its `stage` section: strength, steps, guidance) after the base."""
    from ldm import load_cascade

    t = time.perf_counter()
    cascade = load_cascade(base, ["default"], device="cpu")
    loaded = time.perf_counter() - t
    sr = cascade.stages[1].default_settings
    settings = dict(stage_steps=[25, sr["steps"]], stage_guidance=[5.0, sr["guidance"]])
    low, _ = cascade(PROMPTS[0], seed=0, return_all_stages=True, **settings)  # warm-up; its 64 px image is upscaled
    upscale, whole = [], []
    for i in range(runs):
        t = time.perf_counter()
        cascade(PROMPTS[0], seed=0, init_image=low[0], start_stage=2, **settings)
        upscale.append(time.perf_counter() - t)
        t = time.perf_counter()
        cascade(PROMPTS[i % len(PROMPTS)], seed=i, **settings)
        whole.append(time.perf_counter() - t)
    strength = cascade.stages[1].stage_config.start_strength
    print(f"load the upscaler: {loaded:.2f} s")
    print(f"upscale 64 -> 256 ({sr['steps']} steps at strength {strength:g}: {int(sr['steps'] * strength)} network "
          f"evaluations, guidance {sr['guidance']:g}): median {statistics.median(upscale):.3f} s over {runs}")
    print(f"cascade (25 steps, guidance 5, then the upscale): median {statistics.median(whole):.3f} s over {runs}")


if __name__ == "__main__":
    main()
