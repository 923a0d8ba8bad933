"""Data-parallel scaling of the SD-1.x U-Net training step (synthetic latents), one process per GPU.

    torchrun --nproc_per_node 1 tools/bench_ddp.py --resolution 256 --batch 64
    torchrun --nproc_per_node 2 tools/bench_ddp.py --resolution 256 --batch 64 --compress bf16

Reports global img/s (median of timed steps, CUDA events on rank 0 after a barrier). `--compress bf16` all-reduces
gradients in bf16 (DDP communication hook): half the bytes of the 3.4 GB fp32 gradient exchange per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.models.unet import UNetConfig, UNetModel  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="per GPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compress", choices=["none", "bf16"], default="none")
    p.add_argument("--bucket-mb", type=int, default=100, help="DDP gradient bucket size")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)  # identical initial weights on every rank
    model = UNetModel(UNetConfig()).cuda().train()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local], bucket_cap_mb=args.bucket_mb,
                                                          gradient_as_bucket_view=True, static_graph=True)
        if args.compress == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    size = args.resolution // 8
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(args.batch, 4, size, size, device="cuda", generator=g)
    t = torch.randint(0, 1000, (args.batch,), device="cuda", generator=g).float()
    c = torch.randn(args.batch, 77, 768, device="cuda", generator=g)
    target = torch.randn(x.shape, device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x, t, context=c).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if world > 1:
            dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    result = {"world_size": world, "resolution": args.resolution, "batch_per_gpu": args.batch,
              "compress": args.compress, "ms_per_step": ms, "img_per_s": world * args.batch * 1000 / ms,
              "device": torch.cuda.get_device_name()}
    if world > 1:  # the replicas must agree after the timed steps
        flat = torch.cat([p.detach().float().flatten()[:1000] for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        result["replicas_identical"] = all(torch.equal(gathered[0], g_) for g_ in gathered)
    if rank == 0:
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
