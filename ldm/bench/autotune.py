"""What inductor's autotuner chose, read back from its log: each `AUTOTUNE op(shapes)` block's timed choices (the
extern kernel, cuDNN's `convolution` or cuBLAS's `mm`/`addmm`, against Triton's templates), so a window that runs
out mid-compile still says, shape by shape, what max-autotune would have gained."""
from __future__ import annotations

import re

_BLOCK = re.compile(r"^AUTOTUNE (\w+)\((.*)\)\s*$")
_CHOICE = re.compile(r"^\s+(\S+) ([0-9.]+) ms\b")
_END = re.compile(r"^\w+ AUTOTUNE benchmarking takes ")  # the block's last line (SingleProcess / SubProcess)
# choices inductor generates (Triton templates; decompose_k's split-K subgraph; CUTLASS / CK templates): the
# others (mm, addmm, bias_addmm, convolution, conv1x1_via_mm, ...) are extern library kernels
_GENERATED = ("triton_", "decompose_k_", "cuda_", "cutlass", "ck_")


def _is_extern(name: str) -> bool:
    return not name.startswith(_GENERATED)


def autotune_blocks(log: str) -> list[dict]:
    """Every autotune block of `log`: op, shapes, strides and the listed choices (name, ms), fastest first, plus the
    extern kernel's time (`extern_ms`, None when the log's top-N list leaves it out: slower than every choice shown)
    and the fastest choice's speedup over it."""
    blocks: list[dict] = []
    current = None
    for line in log.splitlines():
        header = _BLOCK.match(line)
        if header:
            current = {"op": header.group(1), "shapes": header.group(2), "choices": []}
            blocks.append(current)
            continue
        if current is None:
            continue
        if line.startswith("strides: "):
            current["strides"] = line[len("strides: "):].strip()
        elif (choice := _CHOICE.match(line)):
            current["choices"].append((choice.group(1), float(choice.group(2))))
        elif _END.match(line):
            current = None  # the block's list ended; other lines (a warning from another thread) are skipped
    for block in blocks:
        choices = block["choices"]
        extern = [ms for name, ms in choices if _is_extern(name)]
        block["best"] = choices[0] if choices else None
        block["extern_ms"] = extern[0] if extern else None
        block["speedup"] = (block["extern_ms"] / choices[0][1]) if extern and choices and choices[0][1] else None
    return [b for b in blocks if b["choices"]]


def autotune_summary(blocks: list[dict]) -> dict:
    """Counts and sums over the blocks: how often a Triton template won, and, over the blocks whose extern time was
    listed, its summed time against the winners' (a lower bound on the gain where it was not listed)."""
    listed = [b for b in blocks if b["extern_ms"] is not None]
    return {"blocks": len(blocks),
            "triton_won": sum(1 for b in blocks if not _is_extern(b["best"][0])),
            "extern_listed": len(listed),
            "extern_ms_listed": round(sum(b["extern_ms"] for b in listed), 4),
            "best_ms_listed": round(sum(b["best"][1] for b in listed), 4),
            "by_op": {op: sum(1 for b in blocks if b["op"] == op) for op in sorted({b["op"] for b in blocks})}}


def tuned_shapes(cache: dict) -> int:
    """How many shapes an inductor local autotune cache file (`$TORCHINDUCTOR_CACHE_DIR/cache/<system hash>`)
    holds timings for. Its "cache" maps op -> inputs key -> precision -> choice -> ms; the same dict also holds
    pad_mm's flat entries (a key -> one float), which are not tuned shapes."""
    entries = cache.get("cache", {})
    return sum(len(by_inputs) for by_inputs in entries.values() if isinstance(by_inputs, dict))


def main(argv: list[str] | None = None) -> None:
    """`python -m ldm.bench.autotune LOG...`: one JSON line per block (op, shapes, strides, best, extern_ms,
    speedup, the log's name), then one summary line per log. `--count-cache FILE...`: the number of shapes in
    inductor's autotune cache files."""
    import argparse  # noqa: PLC0415
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m ldm.bench.autotune", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="perf logs holding inductor's AUTOTUNE blocks (or cache files with --count-cache)")
    parser.add_argument("--count-cache", action="store_true",
                        help="print how many tuned shapes the given autotune cache files hold, summed")
    args = parser.parse_args(argv)
    if args.count_cache:
        print(sum(tuned_shapes(json.loads(Path(path).read_text())) for path in args.paths))
        return
    for path in args.paths:
        blocks = autotune_blocks(Path(path).read_text(errors="replace"))
        for b in blocks:
            print(json.dumps({"log": Path(path).name, "op": b["op"], "shapes": b["shapes"],
                              "strides": b.get("strides"), "best": b["best"][0], "best_ms": b["best"][1],
                              "extern_ms": b["extern_ms"],
                              "speedup": round(b["speedup"], 3) if b["speedup"] else None}))
        print(json.dumps({"log": Path(path).name, "summary": autotune_summary(blocks)}))


if __name__ == "__main__":
    main()
