"""Benchmarks that report numbers (never assertions): ldm's SD-1.x U-Net and autoencoder, beside diffusers' on the same GPU.

    python tools/bench.py --out bench.json                # everything, ours and diffusers (when installed)
    python tools/bench.py --only sample_step --compile    # one benchmark, with torch.compile too

Each number is the median over repeats of CUDA-event timings after warm-up, random (not zero) inputs, random weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm.models.unet import UNetConfig, UNetModel  # noqa: E402

SD1_UNET = UNetConfig()  # the dataclass defaults are SD-1.x
SD1_VAE = AutoencoderConfig()


def timed(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of `fn()` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def diffusers_unet():
    import diffusers

    from ldm.io.keys_unet import unet_config_to_diffusers

    return diffusers.UNet2DConditionModel(**unet_config_to_diffusers(SD1_UNET))


def diffusers_vae():
    import diffusers

    from ldm.io.keys_vae import vae_config_to_diffusers

    return diffusers.AutoencoderKL(**vae_config_to_diffusers(SD1_VAE))


def unet_call(model, impl):
    if impl == "ldm":
        return lambda x, t, c: model(x, t, context=c)
    return lambda x, t, c: model(x, t, encoder_hidden_states=c, return_dict=False)[0]


def bench_sample_step(impl, compile_):
    """One guided sampling step: batch 2 (uncond + cond) at 64x64 latents (512 px), bf16 weights."""
    model = (UNetModel(SD1_UNET) if impl == "ldm" else diffusers_unet()).cuda().to(torch.bfloat16).eval()
    model = model.to(memory_format=torch.channels_last)
    call = unet_call(model, impl)
    if compile_:
        call = torch.compile(call)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    t = torch.tensor([500.0, 500.0], device="cuda")
    c = torch.randn(2, 77, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ms = timed(lambda: call(x, t, c), warmup=5 if compile_ else 3, repeats=20)
    return {"ms_per_step": ms}


def bench_train(impl, compile_, resolution, batch):
    """U-Net training step on latents: fp32 master weights, bf16 autocast, fused AdamW."""
    model = (UNetModel(SD1_UNET) if impl == "ldm" else diffusers_unet()).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    call = unet_call(model, impl)
    if compile_:
        call = torch.compile(call)
    size = resolution // 8
    x = torch.randn(batch, 4, size, size, device="cuda").to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device="cuda").float()
    c = torch.randn(batch, 77, 768, device="cuda")
    target = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(call(x, t, c).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timed(step, warmup=4 if compile_ else 2, repeats=8)
    return {"ms_per_step": ms, "img_per_s": batch * 1000 / ms, "batch": batch}


def bench_vae(impl, what):
    """VAE decode at 512 px (batch 1) and encode at 256 px (batch 32), bf16."""
    vae = (AutoencoderKL(SD1_VAE) if impl == "ldm" else diffusers_vae()).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        if what == "decode":
            z = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
            fn = (lambda: vae.decode(z)) if impl == "ldm" else (lambda: vae.decode(z, return_dict=False)[0])
            return {"ms": timed(fn)}
        x = torch.rand(32, 3, 256, 256, device="cuda", dtype=torch.bfloat16) * 2 - 1
        fn = (lambda: vae.encode(x).mean) if impl == "ldm" else (lambda: vae.encode(x).latent_dist.mean)
        ms = timed(fn)
        return {"ms": ms, "img_per_s": 32 * 1000 / ms}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--only", nargs="*", default=None,
                   help="subset of: sample_step train_256 train_512 vae_decode_512 vae_encode_256")
    p.add_argument("--compile", action="store_true", help="also time torch.compile for the U-Net benchmarks")
    p.add_argument("--impls", nargs="*", default=["ldm", "diffusers"])
    p.add_argument("--batch-256", type=int, default=64)
    p.add_argument("--batch-512", type=int, default=16)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: tools/bench.py measures GPU throughput and needs CUDA", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    impls = [i for i in args.impls if i == "ldm" or _has_diffusers()]
    benches = {
        "sample_step": lambda impl, comp: bench_sample_step(impl, comp),
        "train_256": lambda impl, comp: bench_train(impl, comp, 256, args.batch_256),
        "train_512": lambda impl, comp: bench_train(impl, comp, 512, args.batch_512),
        "vae_decode_512": lambda impl, comp: bench_vae(impl, "decode"),
        "vae_encode_256": lambda impl, comp: bench_vae(impl, "encode"),
    }
    results = []
    for name, fn in benches.items():
        if args.only and name not in args.only:
            continue
        modes = [False, True] if args.compile and not name.startswith("vae") else [False]
        for impl in impls:
            for comp in modes:
                torch.cuda.empty_cache()
                try:
                    r = fn(impl, comp)
                except Exception as e:  # report, keep going: a benchmark tool must not lose the other numbers
                    r = {"error": f"{type(e).__name__}: {e}"[:300]}
                row = {"bench": name, "impl": impl, "compile": comp, **r}
                results.append(row)
                print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))
    print(f"\n{'bench':<16}{'impl':<11}{'compile':<9}{'ms':>10}{'img/s':>10}")
    for r in results:
        ms = r.get("ms_per_step", r.get("ms"))
        ips = r.get("img_per_s")
        print(f"{r['bench']:<16}{r['impl']:<11}{str(r['compile']):<9}"
              f"{(f'{ms:.2f}' if ms else r.get('error', '')[:30]):>10}{(f'{ips:.1f}' if ips else ''):>10}")
    return 0


def _has_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
