"""Time the bundled default model on this machine's CPU: import, load, and one 25-step guided image (warm process).

    python tools/time_default_model.py [--runs 3]

Prints the numbers docs/default-model.md records (its budgets: 1.5 s per image, 1 s to load). A report, not a test:
timings depend on the machine and its load.
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


if __name__ == "__main__":
    main()
