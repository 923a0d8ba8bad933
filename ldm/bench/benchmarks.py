"""The benchmarks of the record (names fixed by issue 12), each returning one `Row`: ours against diffusers on
the same random weights, timed in alternation in one process (`ldm.bench.timing.alternate`).

Ours runs its fast path (`ldm.pipeline.fast`, `ldm.train.compiled`); the peer runs diffusers' own fastest
settings (channels_last, fused q|k|v, torch.compile in the same mode). Eager numbers of both go to `details`.
"""
from __future__ import annotations

import os
import statistics
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.bench.flops import count_flops, mfu, mfu_from_throughput
from ldm.bench.models import diffusers_pipeline, diffusers_unet, diffusers_vae, sd15_parts, sd15_unet
from ldm.bench.record import Row, make_row
from ldm.bench.timing import alternate, call_times_ms
from ldm.pipeline.fast import fast_network
from ldm.pipeline.images import to_pil
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.sampling import sample
from ldm.train.compiled import compile_for_training

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35 mm"


@dataclass
class Bench:
    """What every benchmark shares: the device, its measured peak, the command, and the models built once."""

    device: torch.device
    command: str
    peak_flops: float | None = None
    mode: str | None = "reduce-overhead"  # compile mode of both sides; None: eager
    dtype: torch.dtype = torch.bfloat16
    peer: bool = True  # diffusers installed
    cache: dict = field(default_factory=dict)

    def row(self, name, ours, peer, peer_name, unit, mfu_value, details) -> Row:
        return make_row(name, ours, peer if self.peer else None, peer_name if self.peer else None, unit,
                        mfu=mfu_value, device=self.device, command=self.command, details=details)

    @property
    def compiled(self) -> str:
        """How both sides run, for the peer's name: `torch.compile(MODE)` or eager."""
        return f"torch.compile({self.mode})" if self.mode else "eager"

    def mfu(self, flops: float, ms: float | None) -> float | None:
        return mfu(flops, ms / 1000, self.peak_flops) if self.peak_flops and ms else None

    def parts(self):
        """The SD-1.5 parts (inference dtype), built once and shared by the inference benchmarks."""
        if "parts" not in self.cache:
            self.cache["parts"] = sd15_parts(self.device, self.dtype)
        return self.cache["parts"]

    def unet_flops(self) -> int:
        """FLOPs of one guided step's U-Net call (batch 2, 64x64 latents), counted eagerly, once."""
        if "unet_flops" not in self.cache:
            unet, g = self.parts().unet, torch.Generator(self.device).manual_seed(0)
            x = torch.randn(2, 4, 64, 64, device=self.device, dtype=self.dtype, generator=g)
            c = torch.randn(2, 77, 768, device=self.device, dtype=self.dtype, generator=g)
            t = torch.tensor([501.0, 501.0], device=self.device)
            with torch.no_grad(), eager():
                self.cache["unet_flops"] = count_flops(lambda: unet(x, t, context=c))
        return self.cache["unet_flops"]

    def peer_pipeline(self):
        if "peer_pipe" not in self.cache:
            self.cache["peer_pipe"] = diffusers_pipeline(self.parts(), self.device, self.dtype)
        return self.cache["peer_pipe"]


def diffusers_fast(module, mode: str, *, fuse: bool = True):
    """diffusers' fastest documented settings: fused q|k|v projections, channels_last, torch.compile(mode); once."""
    if getattr(module, "_bench_fast", False):
        return module
    module._bench_fast = True
    if fuse and hasattr(module, "fuse_qkv_projections"):
        module.fuse_qkv_projections()
    module.to(memory_format=torch.channels_last)
    if mode is not None:
        module.compile(mode=mode, dynamic=False)
    return module


def eager():
    """Run compiled modules eagerly inside the block (their compiled graphs are kept for later)."""
    return torch.compiler.set_stance("force_eager")


def unet_step(b: Bench) -> Row:
    """One guided SD-1.5 step at 512 px: the U-Net at batch 2 (uncond + cond), 64x64 latents, 77 text tokens."""
    unet = b.parts().unet
    g = torch.Generator(b.device).manual_seed(0)
    x = torch.randn(2, 4, 64, 64, device=b.device, dtype=b.dtype, generator=g)
    t = torch.tensor([501.0, 501.0], device=b.device)
    c = torch.randn(2, 77, 768, device=b.device, dtype=b.dtype, generator=g)
    mask = torch.ones(2, 77, dtype=torch.bool, device=b.device)  # what the pipeline passes (CLIP: all True)
    ours = lambda: unet(x, t, context=c, context_mask=mask)  # noqa: E731
    sides = {"ours": ours}
    if b.peer:
        peer_unet = b.peer_pipeline().unet
        sides["peer"] = lambda: peer_unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
    details = {"batch": 2, "latent": 64, "dtype": str(b.dtype), "mode": b.mode}
    flops = b.unet_flops()
    with torch.no_grad():
        with eager():
            details["eager_ms"] = alternate(sides, b.device, rounds=3, repeats=5)
        fast_network(unet, mode=b.mode)
        if b.peer:
            diffusers_fast(peer_unet, b.mode)
        times = alternate(sides, b.device, warmup=4, rounds=5, repeats=10)
    details["flops"] = flops
    return b.row("unet_step_sd15_512_b1_cfg", times["ours"], times.get("peer"),
                 f"diffusers UNet2DConditionModel, fused qkv, channels_last, {b.compiled}", "ms",
                 b.mfu(flops, times["ours"]), details)


def txt2img(b: Bench, steps: int = 50, guidance: float = 7.5) -> Row:
    """One 512 px image end to end: text encoder, 50 guided DDIM steps, VAE decode, PIL image."""
    pipe = Pipeline(b.parts(), device=b.device, dtype=b.dtype).compile(mode=b.mode)
    sides = {"ours": lambda: pipe(PROMPT, steps=steps, guidance=guidance, sampler="ddim", seed=0,
                                  height=512, width=512)}
    if b.peer:
        peer = b.peer_pipeline()
        diffusers_fast(peer.unet, b.mode)  # nothing more when unet_step made it fast already
        diffusers_fast(peer.vae.decoder, b.mode, fuse=False)
        sides["peer"] = lambda: peer(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=512,
                                     width=512, generator=torch.Generator(b.device).manual_seed(0))
    with torch.no_grad():
        times = alternate(sides, b.device, warmup=2, rounds=3, repeats=2)
    flops = steps * b.unet_flops()  # the U-Net's share; the decoder and text encoder add a few per cent
    seconds = {k: v / 1000 for k, v in times.items()}
    return b.row(f"txt2img_sd15_512_{steps}steps_b1", seconds["ours"], seconds.get("peer"),
                 f"diffusers StableDiffusionPipeline (DDIM), U-Net and VAE decoder fused/channels_last/{b.compiled}",
                 "s", b.mfu(flops, times["ours"]),
                 {"steps": steps, "guidance": guidance, "sampler": "ddim", "dtype": str(b.dtype), "mode": b.mode,
                  "flops_unet_only": flops})


def train(b: Bench, resolution: int, batch: int, compile_: bool = True) -> Row:
    """One U-Net training step on precomputed latents: fp32 weights, bf16 autocast, fused AdamW, MSE on eps."""
    size = resolution // 8
    unet = sd15_unet(b.device, torch.float32).train()
    models = {"ours": unet}
    if b.peer:
        models["peer"] = diffusers_unet(unet).train()
    g = torch.Generator(b.device).manual_seed(1)
    x = torch.randn(batch, 4, size, size, device=b.device, generator=g)
    t = torch.randint(0, 1000, (batch,), device=b.device, generator=g).float()
    c = torch.randn(batch, 77, 768, device=b.device, generator=g)
    target = torch.randn(x.shape, device=b.device, generator=g)
    calls = {"ours": lambda m: m(x, t, context=c),
             "peer": lambda m: m(x, t, encoder_hidden_states=c, return_dict=False)[0]}
    steps = {}
    for name, model in models.items():
        model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step(model=model, opt=opt, call=calls[name]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.mse_loss(call(model).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    flops = count_flops(steps["ours"])
    details = {"batch": batch, "resolution": resolution, "compile": compile_, "flops_per_step": flops}
    if compile_:
        compile_for_training(unet)
        if b.peer:
            models["peer"].compile(dynamic=False)
    try:
        times = alternate(steps, b.device, warmup=3, rounds=3, repeats=3)
    except Exception as e:  # noqa: BLE001  the compiled step failed: record why, and the eager numbers
        details["compile_error"] = "".join(traceback.format_exception_only(e)).strip()[-2000:]
        with eager():
            times = alternate(steps, b.device, warmup=2, rounds=3, repeats=3)
        details["compile"] = False
    ips = {k: batch * 1000 / v for k, v in times.items()}
    del models, steps, unet
    torch.cuda.empty_cache()
    return b.row(f"train_sd15_unet_{resolution}", ips["ours"], ips.get("peer"),
                 "diffusers UNet2DConditionModel, same step" + (" (torch.compile)" if details["compile"] else ""),
                 "img/s", mfu_from_throughput(flops / batch, ips["ours"], b.peak_flops) if b.peak_flops else None,
                 details)


def vae_encode(b: Bench, batch: int = 32, resolution: int = 256) -> Row:
    """The KL encoder's posterior mean for a batch of 256 px images (what latent precomputation runs)."""
    autoencoder = b.parts().autoencoder
    x = (torch.rand(batch, 3, resolution, resolution, device=b.device, dtype=b.dtype) * 2 - 1)
    ours = lambda: autoencoder.encode(x).mean  # noqa: E731
    sides = {"ours": ours}
    details = {"batch": batch, "resolution": resolution, "dtype": str(b.dtype), "mode": b.mode}
    if b.peer:
        peer = diffusers_vae(autoencoder)
        sides["peer"] = lambda: peer.encode(x).latent_dist.mean
    with torch.no_grad():
        flops = count_flops(ours)
        with eager():
            details["eager_ms"] = alternate(sides, b.device, rounds=3, repeats=3)
        fast_network(autoencoder.encoder, mode=b.mode, fuse=False)
        if b.peer:
            diffusers_fast(peer.encoder, b.mode, fuse=False)
        times = alternate(sides, b.device, warmup=3, rounds=3, repeats=5)
    ips = {k: batch * 1000 / v for k, v in times.items()}
    details["flops_per_batch"] = flops
    return b.row(f"vae_encode_{resolution}", ips["ours"], ips.get("peer"),
                 f"diffusers AutoencoderKL, channels_last, {b.compiled}", "img/s",
                 mfu_from_throughput(flops / batch, ips["ours"], b.peak_flops) if b.peak_flops else None, details)


def eval_generate(b: Bench, prompts: int = 16, steps: int = 25, batches: tuple[int, ...] = (8, 16)) -> Row:
    """Prompt-set generation: `prompts` prompts x 25 guided steps at 512 px, each side at its best batch size."""
    texts = [f"{PROMPT}, variation {i}" for i in range(prompts)]
    pipe = Pipeline(b.parts(), device=b.device, dtype=b.dtype)
    settings = pipe.settings(steps=steps, guidance=7.5, sampler="ddim", seed=0, height=512, width=512)
    best: dict[str, tuple[float, int]] = {}
    for batch in batches:
        groups = [texts[i:i + batch] for i in range(0, prompts, batch)]
        sides = {"ours": lambda groups=groups: [to_pil(sample(pipe.stage, g, settings)) for g in groups]}
        if b.peer:
            peer = b.peer_pipeline()
            sides["peer"] = lambda groups=groups, peer=peer: [
                peer(g, num_inference_steps=steps, guidance_scale=7.5, height=512, width=512,
                     generator=torch.Generator(b.device).manual_seed(0)) for g in groups]
        with torch.no_grad(), eager():
            times = alternate(sides, b.device, warmup=1, rounds=2, repeats=1)
        for name, ms in times.items():
            rate = prompts * 1000 / ms
            if rate > best.get(name, (0, 0))[0]:
                best[name] = (rate, batch)
    return b.row(f"eval_generate_sd15_512_{steps}steps", best["ours"][0], best.get("peer", (None,))[0],
                 "diffusers StableDiffusionPipeline with a list of prompts (DDIM)", "images/s", None,
                 {"prompts": prompts, "steps": steps, "batches_tried": list(batches), "compiled": False,
                  "best_batch": {k: v[1] for k, v in best.items()}})


def cpu_default_model(command: str, steps: int = 25, guidance: float = 5.0, runs: int = 3) -> Row:
    """The bundled default model on this machine's CPU: one guided image (25 steps, guidance 5), warm process."""
    pipe = load_pipeline(device="cpu")
    run = lambda: pipe("an emoji of a red apple, twemoji style", steps=steps, guidance=guidance, seed=0)  # noqa: E731
    run()  # warm-up
    ms = statistics.median(call_times_ms(run, "cpu", runs))
    return make_row("txt2img_default_model_cpu_25steps", ms / 1000, None, None, "s", mfu=None, device="cpu",
                    command=command, details={"steps": steps, "guidance": guidance, "runs": runs,
                                              "model": Path(pipe.model_name).name,
                                              "load_average": os.getloadavg()})  # a shared machine: how busy
