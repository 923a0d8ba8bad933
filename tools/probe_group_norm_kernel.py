"""Where the Triton GroupNorm(+SiLU) kernel (`ldm.models.group_norm_kernel`) spends its time, norm by norm.

Run 10 measured the kernel slower in the compiled guided step (8.38 against 7.14 ms): its three kernels took 1.59 ms
where inductor's norms had taken ~1 ms, and inductor's neighbouring element-wise work, no longer fused into the norms,
grew by 0.47 ms. This probe separates the two. It records every GroupNorm of the SD-1.5 U-Net's guided step (batch 2,
64x64 latents, bf16, NHWC; shape, SiLU, time-embedding shift), then times each distinct norm three ways, each as a
CUDA graph of 20 calls (launch cost excluded, as in the reduce-overhead step):
- `inductor`: `silu(group_norm(x + shift))` compiled by torch.compile (default mode), as the fast path computes it;
- `channel_sums`: the same written as per-channel sums (`ldm.models.channel_sums_group_norm`), compiled alike;
- `kernel`: `torch.ops.ldm.group_norm_nhwc` at the module's tiling (and at each `--tilings`
  SUM_CHANNELS:SUM_ELEMENTS:PROGRAMS_PER_SM);
- `kernels`: the kernel's three launches apart (channel sums, group statistics, apply), from the profiler.
Each line is per norm in microseconds; `step_us` sums them over the step's 61 norms. Then the eager guided step with
and without the kernel (the default generation path is eager), in alternation. Prints JSON lines.

    python tools/probe_group_norm_kernel.py                      # GPU (~1-2 minutes)
    python tools/probe_group_norm_kernel.py --tilings 64:4096:4 128:8192:2
"""
import argparse
import collections
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.bench.models import guided_step_inputs, sd15_unet  # noqa: E402
from ldm.bench.timing import alternate  # noqa: E402
from ldm.models import group_norm_kernel as gnk  # noqa: E402
from ldm.models.channel_sums_group_norm import group_norm_channel_sums  # noqa: E402
from ldm.models.fused_group_norm import FusedGroupNorm, use_fused_group_norm  # noqa: E402
from ldm.pipeline.fast import fast_network  # noqa: E402

CALLS = 20  # calls per CUDA graph


def graph_us(fn, repeats: int = 15) -> float:
    """Median microseconds per call of `fn`, replayed as a CUDA graph of CALLS calls (launch cost excluded)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def kernel_split_us(fn) -> dict:
    """Microseconds per call of each CUDA kernel `fn` launches (the profiler, 20 calls after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    return {e.key: round(e.device_time_total / CALLS, 2) for e in prof.key_averages() if e.device_time_total > 0}


def record_norms(unet, x, t, c) -> collections.Counter:
    """(shape, silu, shift) of each FusedGroupNorm call in one guided step, counted."""
    seen = collections.Counter()

    def hook(module, args, kwargs):
        shift = kwargs.get("shift", args[1] if len(args) > 1 else None)
        seen[(tuple(args[0].shape), module.num_groups, module.eps, module.fuses_silu, shift is not None)] += 1

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules()
               if isinstance(m, FusedGroupNorm)]
    with torch.no_grad():
        unet(x, t, context=c)
    for h in handles:
        h.remove()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tilings", nargs="*", default=[], help="SUM_CHANNELS:SUM_ELEMENTS:PROGRAMS_PER_SM to time "
                   f"besides the module's {gnk.SUM_CHANNELS}:{gnk.SUM_ELEMENTS}:{gnk.PROGRAMS_PER_SM}")
    p.add_argument("--no-step", action="store_true", help="skip the eager guided step")
    args = p.parse_args()
    device = torch.device("cuda")
    unet = sd15_unet(device, torch.bfloat16)
    fast_network(unet, mode=None)
    x, t, c = guided_step_inputs(unet, 64, device, torch.bfloat16)
    use_fused_group_norm(unet)
    norms = record_norms(unet, x, t, c)
    tilings = [(gnk.SUM_CHANNELS, gnk.SUM_ELEMENTS, gnk.PROGRAMS_PER_SM)]
    tilings += [tuple(int(v) for v in s.split(":")) for s in args.tilings]
    totals = collections.Counter()
    gen = torch.Generator(device).manual_seed(0)
    for (shape, groups, eps, silu, has_shift), count in sorted(norms.items()):
        n, ch = shape[0], shape[1]
        xs = (torch.randn(shape, device=device, generator=gen) * 2 + 0.5).to(torch.bfloat16)
        xs = xs.contiguous(memory_format=torch.channels_last)
        w = (1 + 0.1 * torch.randn(ch, device=device, generator=gen)).to(torch.bfloat16)
        b = (0.1 * torch.randn(ch, device=device, generator=gen)).to(torch.bfloat16)
        shift = torch.randn(n, ch, device=device, generator=gen).to(torch.bfloat16) if has_shift else None

        def reference(xs=xs, w=w, b=b, shift=shift, groups=groups, eps=eps, silu=silu):
            h = xs if shift is None else xs + shift[:, :, None, None]
            h = F.group_norm(h, groups, w, b, eps)
            return F.silu(h) if silu else h

        def sums(xs=xs, w=w, b=b, shift=shift, groups=groups, eps=eps, silu=silu):
            h = xs if shift is None else xs + shift[:, :, None, None]
            h = group_norm_channel_sums(h, groups, w, b, eps)
            return F.silu(h) if silu else h

        compiled = torch.compile(reference, dynamic=False)
        compiled_sums = torch.compile(sums, dynamic=False)
        line = {"shape": shape, "silu": silu, "shift": has_shift, "count": count,
                "inductor_us": round(graph_us(compiled), 2), "channel_sums_us": round(graph_us(compiled_sums), 2),
                "channel_sums_change": ((compiled_sums().float() - reference().float()).norm()
                                        / reference().float().norm()).item()}
        totals["inductor"] += line["inductor_us"] * count
        totals["channel_sums"] += line["channel_sums_us"] * count
        for tiling in tilings:
            gnk.SUM_CHANNELS, gnk.SUM_ELEMENTS, gnk.PROGRAMS_PER_SM = tiling
            name = "kernel_" + ":".join(map(str, tiling))

            def kernel(xs=xs, w=w, b=b, shift=shift, groups=groups, eps=eps, silu=silu):
                return torch.ops.ldm.group_norm_nhwc(xs, w, b, groups, eps, silu, shift)

            line[name + "_us"] = round(graph_us(kernel), 2)
            totals[name] += line[name + "_us"] * count
            if tiling == tilings[0]:
                line["kernels_us"] = kernel_split_us(kernel)
                line["change"] = ((kernel().float() - reference().float()).norm()
                                  / reference().float().norm()).item()
        gnk.SUM_CHANNELS, gnk.SUM_ELEMENTS, gnk.PROGRAMS_PER_SM = tilings[0]
        print(json.dumps(line), flush=True)
    print(json.dumps({"norms_per_step": sum(norms.values()), "step_us": {k: round(v, 1) for k, v in totals.items()},
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    if args.no_step:
        return
    plain = copy.deepcopy(unet)
    use_fused_group_norm(plain, False)
    with torch.no_grad():
        ms = alternate({"eager": lambda: plain(x, t, context=c), "eager + kernel": lambda: unet(x, t, context=c)},
                       device, rounds=5, repeats=5)
    print(json.dumps({"eager_step_ms": {k: round(v, 2) for k, v in ms.items()}}), flush=True)


if __name__ == "__main__":
    main()
