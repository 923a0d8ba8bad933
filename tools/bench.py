"""The benchmark record: ldm against diffusers on one GPU, same random SD-1.5 weights, ours and the peer timed in
alternation; every run appends one JSON line per benchmark to docs/benchmarks/results.jsonl.

    python tools/bench.py                                   # every GPU benchmark, rows appended to the record
    python tools/bench.py --only unet_step_sd15_512_b1_cfg  # one benchmark
    python tools/bench.py --cpu                             # the bundled default model on this machine's CPU
    python tools/bench.py --dry-run --out /tmp/dry.jsonl    # every path with toy networks on the CPU (no numbers)

A row: benchmark, ours, peer, peer_name, speedup (> 1: ours faster), unit, mfu (counted FLOPs per second over the
device's measured bf16 matmul peak), device, torch, date, command, and details. docs/benchmarks/README.md says
what each lever is predicted and measured to give.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.bench import benchmarks as bench  # noqa: E402
from ldm.bench.flops import measure_peak  # noqa: E402
from ldm.bench.record import RESULTS, append_rows, row_json  # noqa: E402
from ldm.cli.common import cli_main  # noqa: E402
from ldm.errors import LdmError  # noqa: E402
from ldm.models.attention import set_sdpa_kernels  # noqa: E402
from ldm.pipeline.fast import COMPILE_MODES  # noqa: E402

GPU_BENCHMARKS = ("unet_step_sd15_512_b1_cfg", "txt2img_sd15_512_50steps_b1", "vae_encode_256",
                  "train_sd15_unet_256", "train_sd15_unet_512", "eval_generate_sd15_512_25steps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / RESULTS,
                   help="the JSONL record the rows are appended to")
    p.add_argument("--only", nargs="+", default=None, choices=GPU_BENCHMARKS, metavar="NAME",
                   help=f"a subset of: {' '.join(GPU_BENCHMARKS)}")
    p.add_argument("--cpu", action="store_true", help="time the bundled default model on the CPU (25 steps, "
                   "guidance 5) instead of the GPU benchmarks")
    p.add_argument("--runs", type=int, default=3, help="--cpu: timed images after one warm-up (the median)")
    p.add_argument("--mode", default="reduce-overhead", choices=COMPILE_MODES, help="torch.compile mode, both sides")
    p.add_argument("--sdpa", nargs="+", default=None, metavar="KERNEL",
                   help="preferred SDPA kernels for ours (flash, cudnn, efficient, math)")
    p.add_argument("--cudnn-heuristics", action="store_true", help="both sides with cuDNN's heuristic convolution "
                   "algorithms (torch.backends.cudnn.benchmark off, as ldm-txt2img, ldm-eval and training run; "
                   "this tool turns it on by default)")
    p.add_argument("--no-peer", action="store_true", help="ours only (no diffusers)")
    p.add_argument("--no-train-compile", action="store_true", help="eager training steps on both sides")
    p.add_argument("--eager", action="store_true", help="no torch.compile anywhere, both sides (fused q|k|v and "
                   "channels_last stay): the levers without compile time")
    p.add_argument("--batch-256", type=int, default=128, help="training batch at 256 px (runs 1-3: 64)")
    p.add_argument("--batch-512", type=int, default=32, help="training batch at 512 px")
    p.add_argument("--eval-batches", type=int, nargs="+", default=None, metavar="N",
                   help="eval_generate's batch sizes (default 8 16; run 5: both sides best at 16)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the benchmarks still to run (and unet_step's compiled levers) once this many seconds "
                   "have passed")
    p.add_argument("--levers", type=Path, default=None, metavar="JSONL",
                   help="unet_step also times its levers one at a time (eager: NHWC, fused q|k|v, SDPA kernels, no "
                   "mask; compiled: default, CUDA graphs alone, no mask) and appends them to this file")
    p.add_argument("--compiled-levers-only", action="store_true",
                   help="with --levers: unet_step writes only its compiled levers (no row, no eager levers), for a "
                   "window after one that measured those")
    p.add_argument("--lever-names", nargs="+", default=(), metavar="TEXT",
                   help="with --levers: only the compiled levers whose names contain one of these (e.g. FP8 freezing)")
    p.add_argument("--train-both-compiled", action="store_true",
                   help="train_*: only the both-compiled row (no eager timing, no ours-compiled row against the "
                   "eager peer), for a window after one that measured those")
    p.add_argument("--activation-checkpointing", action="store_true", help="training rows: both sides recompute "
                   "their blocks' activations in the backward (for the larger batches --batch-512/--batch-256 give)")
    p.add_argument("--fp8", action="store_true", help="training rows: ours with its transformer linears in FP8 "
                   "(the peer as it is); the rows say so in details.fp8")
    p.add_argument("--dry-run", action="store_true", help="toy-width networks on the CPU, torch.compile's eager "
                   "backend: runs every code path the GPU run will take, in seconds; the rows say dry_run")
    return p


def _has_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python tools/bench.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.cpu:
        row = bench.cpu_default_model(command.strip(), runs=args.runs)
        append_rows(args.out, [row])
        print(row_json(row))
        return 0
    start = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        raise LdmError("tools/bench.py times GPUs and found no CUDA device; use --cpu for the CPU row "
                       "(or --dry-run to exercise the code paths)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not args.cudnn_heuristics
    if args.compiled_levers_only and (not args.levers or args.eager):
        raise LdmError("--compiled-levers-only needs --levers FILE and compiled networks: add --levers, drop --eager")
    if args.train_both_compiled and (args.eager or args.no_train_compile or args.no_peer):
        raise LdmError("--train-both-compiled compiles both sides' training steps: drop --eager, --no-train-compile "
                       "and --no-peer")
    if args.eager:
        args.no_train_compile = True
    if args.sdpa:
        set_sdpa_kernels(args.sdpa)
    device = torch.device("cpu" if args.dry_run else "cuda")
    b = bench.Bench(device, command.strip(), peak_flops=None if args.dry_run else measure_peak(device),
                    mode=None if args.eager else args.mode, peer=not args.no_peer and _has_diffusers(),
                    backend="eager" if args.dry_run else "inductor", tiny=args.dry_run, sdpa=args.sdpa,
                    levers=args.levers, lever_names=tuple(args.lever_names), fp8=args.fp8,
                    checkpointing=args.activation_checkpointing,
                    deadline=None if args.budget_s is None else start + args.budget_s)
    if b.peak_flops:
        print(f"measured peak: {b.peak_flops / 1e12:.0f} TFLOP/s (bf16 8192^3 matmul)", flush=True)
    vae_batch = 2 if args.dry_run else 32
    # --dry-run: 4 prompts at batch 2 and 4 take eval_generate's every path in a few minutes on a 2-core CPU
    eval_set = {"prompts": 4, "batches": (2, 4)} if args.dry_run else {}
    if args.eval_batches:
        if any(n < 1 for n in args.eval_batches):
            raise LdmError(f"--eval-batches {args.eval_batches}: give batch sizes of 1 or more")
        eval_set["batches"] = tuple(args.eval_batches)
    record = lambda row: (append_rows(args.out, [row]), print(row_json(row), flush=True))  # noqa: E731
    runs = {
        "unet_step_sd15_512_b1_cfg": lambda: bench.unet_step(b),
        "txt2img_sd15_512_50steps_b1": lambda: bench.txt2img(b),
        "vae_encode_256": lambda: bench.vae_encode(b, batch=vae_batch),
        "eval_generate_sd15_512_25steps": lambda: bench.eval_generate(b, record=record, **eval_set),
        "train_sd15_unet_256": lambda: bench.train(b, 256, args.batch_256, not args.no_train_compile, record,
                                                   both_compiled_only=args.train_both_compiled),
        "train_sd15_unet_512": lambda: bench.train(b, 512, args.batch_512, not args.no_train_compile, record,
                                                   both_compiled_only=args.train_both_compiled),
    }
    for name, run in runs.items():
        if args.only and name not in args.only:
            continue
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            print(f"skipped {name}: the --budget-s of {args.budget_s:.0f} s is spent", flush=True)
            continue
        t = time.monotonic()
        if name == "unet_step_sd15_512_b1_cfg" and args.compiled_levers_only:
            bench.compiled_levers_alone(b)  # each lever waits for the budget to allow it; no row
            print(f"compiled levers written to {args.levers} ({time.monotonic() - t:.0f} s)", flush=True)
            continue
        try:
            row = run()
        except Exception as e:  # noqa: BLE001  one failing benchmark must not lose the others' rows
            message = f"{type(e).__name__}: {e}"[:3000]
            print(f"{name} failed after {time.monotonic() - t:.0f} s: {message}", flush=True)
            row = b.row(name, None, None, None, bench.UNITS[name], None,
                        {"error": message, "seconds": round(time.monotonic() - t)})
        append_rows(args.out, [row])  # at once: a run cut short keeps every row it finished
        print(row_json(row), f"({time.monotonic() - t:.0f} s)", flush=True)
        if name == "unet_step_sd15_512_b1_cfg" and args.levers and row.ours is not None and b.mode:
            bench.compiled_levers(b)  # after the row is safe: each lever waits for the budget to allow it
    return 0


if __name__ == "__main__":
    sys.exit(main())
