"""The benchmarks of the record (names fixed by issue 12), each returning one `Row`: ours against diffusers on
the same random weights, timed in alternation in one process (`ldm.bench.timing.alternate`).

Ours runs its fast path (`ldm.pipeline.fast`, `ldm.train.compiled`); the peer runs diffusers' own fastest
settings (channels_last, fused q|k|v, torch.compile in the same mode). Eager numbers of both go to `details`.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.bench.flops import count_flops, mfu, mfu_from_throughput
from ldm.bench.models import (diffusers_pipeline, diffusers_unet, diffusers_vae, guided_step_inputs, relative_l2,
                               sd15_parts, sd15_unet)
from ldm.bench.profile import kernel_breakdown
from ldm.bench.record import Row, make_row
from ldm.bench.timing import alternate, call_times_ms
from ldm.errors import LdmError
from ldm.models.attention import set_sdpa_kernels
from ldm.models.channel_sums_group_norm import use_channel_sums_group_norm
from ldm.models.float8 import from_float8, to_float8
from ldm.models.fused import fuse_qkv
from ldm.models.fused_group_norm import use_fused_group_norm
from ldm.pipeline.fast import compile_pipeline, fast_network
from ldm.pipeline.images import to_pil
from ldm.pipeline.load import load_pipeline
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.sampling import sample
from ldm.train.compiled import compile_for_training

UNITS = {"unet_step_sd15_512_b1_cfg": "ms", "txt2img_sd15_512_50steps_b1": "s", "vae_encode_256": "img/s",
         "train_sd15_unet_256": "img/s", "train_sd15_unet_512": "img/s", "eval_generate_sd15_512_25steps": "images/s"}
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
    backend: str = "inductor"  # torch.compile backend of both sides ("eager" for --dry-run's plumbing)
    tiny: bool = False  # --dry-run: toy-width networks and 64 px images, to exercise every path on the CPU
    sdpa: list[str] | None = None  # the preferred SDPA kernels of ours (--sdpa), restored after each lever
    levers: Path | None = None  # where unet_step writes its one-lever-at-a-time table (JSON lines)
    lever_names: tuple[str, ...] = ()  # only the compiled levers whose names contain one of these (all when empty)
    deadline: float | None = None  # time.monotonic() after which optional extras are skipped
    fp8: bool = False  # training rows: ours with FP8 transformer linears (ldm.models.float8)
    checkpointing: bool = False  # training rows: activation (gradient) checkpointing on both sides
    cache: dict = field(default_factory=dict)

    def row(self, name, ours, peer, peer_name, unit, mfu_value, details) -> Row:
        details = {**details, "cudnn_benchmark": torch.backends.cudnn.benchmark}
        if self.tiny:
            details = {**details, "dry_run": "toy-width networks on the CPU: plumbing only, not a measurement"}
        return make_row(name, ours, peer if self.peer else None, peer_name if self.peer else None, unit,
                        mfu=mfu_value, device=self.device, command=self.command, details=details)

    @property
    def image_size(self) -> int:
        return 64 if self.tiny else 512

    def seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def compile_options(self, mode: str | None) -> dict:
        """torch.compile keywords for `mode` under this run's backend (modes are inductor's)."""
        return {"backend": self.backend, **({"mode": mode} if self.backend == "inductor" and mode else {})}

    @property
    def compiled(self) -> str:
        """How both sides run, for the peer's name: `torch.compile(MODE)` or eager."""
        return f"torch.compile({self.mode})" if self.mode else "eager"

    def mfu(self, flops: float, ms: float | None) -> float | None:
        return mfu(flops, ms / 1000, self.peak_flops) if self.peak_flops and ms else None

    def parts(self):
        """The SD-1.5 parts (inference dtype), built once and shared by the inference benchmarks."""
        if "parts" not in self.cache:
            self.cache["parts"] = sd15_parts(self.device, self.dtype, tiny=self.tiny)
        return self.cache["parts"]

    def unet_flops(self) -> int:
        """FLOPs of one guided step's U-Net call (batch 2, 64x64 latents), counted eagerly, once."""
        if "unet_flops" not in self.cache:
            unet = self.parts().unet
            x, t, c = self.step_inputs()
            with torch.no_grad(), eager():
                self.cache["unet_flops"] = count_flops(lambda: unet(x, t, context=c))
        return self.cache["unet_flops"]

    def step_inputs(self):
        """(x, t, context) of one guided step: batch 2, the image size's latents, 77 random text tokens."""
        return guided_step_inputs(self.parts().unet, self.image_size // 8, self.device, self.dtype)

    def peer_pipeline(self):
        if "peer_pipe" not in self.cache:
            self.cache["peer_pipe"] = diffusers_pipeline(self.parts(), self.device, self.dtype)
        return self.cache["peer_pipe"]


def diffusers_fast(module, mode: str, *, fuse: bool = True, backend: str = "inductor"):
    """diffusers' fastest documented settings: fused q|k|v projections, channels_last, torch.compile(mode); once."""
    if getattr(module, "_bench_fast", False):
        return module
    module._bench_fast = True
    if fuse and hasattr(module, "fuse_qkv_projections"):
        module.fuse_qkv_projections()
    module.to(memory_format=torch.channels_last)
    if mode is not None:
        module.compile(dynamic=False, backend=backend, **({"mode": mode} if backend == "inductor" else {}))
    return module


def eager():
    """Run compiled modules eagerly inside the block (their compiled graphs are kept for later)."""
    return torch.compiler.set_stance("force_eager")


PEER_AUTOTUNE_NOTE = ("max-autotune not run for the peer in this row (its compile takes minutes); measured apart in "
                      "run 9 (docs/benchmarks/README.md): 8.17 ms against its reduce-overhead's 7.24 ms on one H200, "
                      "so reduce-overhead is the peer's fastest mode")


def unet_step(b: Bench) -> Row:
    """One guided SD-1.5 step at 512 px: the U-Net at batch 2 (uncond + cond), 64x64 latents, 77 text tokens."""
    unet = b.parts().unet
    x, t, c = b.step_inputs()
    mask = torch.ones(2, 77, dtype=torch.bool, device=b.device)  # CLIP's, which the pipeline drops (the levers)
    ours = lambda: unet(x, t, context=c)  # noqa: E731  as the pipeline calls it (drop_full_masks)
    sides = {"ours": ours}
    if b.peer:
        peer_unet = b.peer_pipeline().unet
        sides["peer"] = lambda: peer_unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
    details = {"batch": 2, "latent": x.shape[-1], "dtype": str(b.dtype), "mode": b.mode,
               "context_mask": "None (the pipeline drops CLIP's all-True mask)"}
    flops = b.unet_flops()
    with torch.no_grad():
        with eager():
            details["eager_ms"] = alternate(sides, b.device, rounds=3, repeats=5)
        if b.levers:
            eager_levers(b, unet, x, t, c, mask)
        fast_network(unet, mode=b.mode, backend=b.backend)
        if b.peer:
            diffusers_fast(peer_unet, b.mode, backend=b.backend)
        times = alternate(sides, b.device, warmup=4, rounds=5, repeats=10)
    details["flops"] = flops
    if b.peer and b.mode:
        details["peer_modes"] = {b.mode: times["peer"], "max-autotune": PEER_AUTOTUNE_NOTE}
    if b.levers:
        write_lever(b, f"+ torch.compile({b.mode}), {b.backend}: the fast path", times["ours"], times.get("peer"))
    return b.row("unet_step_sd15_512_b1_cfg", times["ours"], times.get("peer"),
                 f"diffusers UNet2DConditionModel, fused qkv, channels_last, {b.compiled}", "ms",
                 b.mfu(flops, times["ours"]), details)


def write_lever(b: Bench, config: str, ms: float, peer_ms: float | None = None, **extra) -> None:
    """Append one line of the lever table (ms per guided step of ours; the peer where it ran the same lever)."""
    line = {"benchmark": "unet_step_sd15_512_b1_cfg", "config": config, "ours_ms": ms, "peer_ms": peer_ms, **extra}
    if b.tiny:
        line["dry_run"] = True
    b.levers.parent.mkdir(parents=True, exist_ok=True)
    with open(b.levers, "a", encoding="utf-8") as f:  # line by line: a run cut short keeps what it measured
        f.write(json.dumps(line, allow_nan=False) + "\n")
    print("lever:", json.dumps(line), flush=True)


def _step_ms(b: Bench, fn) -> float:
    return alternate({"ours": fn}, b.device, warmup=3, rounds=3, repeats=5)["ours"]


def eager_levers(b: Bench, unet, x, t, c, mask) -> None:
    """The eager step with one lever added at a time (each on top of the ones before, SDPA kernels one by one)."""
    with_mask = lambda: unet(x, t, context=c, context_mask=mask)  # noqa: E731
    write_lever(b, "eager, NCHW, separate q/k/v, all-True context mask, SDPA default", _step_ms(b, with_mask))
    unet.to(memory_format=torch.channels_last)
    write_lever(b, "+ channels_last (NHWC)", _step_ms(b, with_mask))
    fuse_qkv(unet)
    write_lever(b, "+ fused q|k|v", _step_ms(b, with_mask))
    if b.device.type == "cuda":  # the kernel preferences only steer CUDA's SDPA
        for kernel in ("flash", "cudnn", "efficient"):
            set_sdpa_kernels([kernel])
            try:
                write_lever(b, f"+ SDPA prefers {kernel} (others as fallback)", _step_ms(b, with_mask))
            except Exception as e:  # noqa: BLE001  a kernel this build lacks: say so, keep going
                write_lever(b, f"+ SDPA prefers {kernel} (others as fallback)", None, error=f"{type(e).__name__}: {e}")
            finally:
                set_sdpa_kernels(b.sdpa)
    write_lever(b, "+ no context mask (None: CLIP's all-True mask dropped, flash can take cross-attention)",
                _step_ms(b, lambda: unet(x, t, context=c)))


@dataclass(frozen=True)
class Lever:
    """One compiled configuration of the guided step: compile keywords (over the run's backend), the seconds it
    needs at least, and whether it keeps the all-True mask, runs FP8 or the Triton GroupNorm, profiles kernels, or
    compiles the peer's U-Net instead of ours (its time goes to the lever line's `peer_ms`), or prefers other SDPA
    kernels."""

    name: str
    options: dict
    needs_s: int
    mask: bool = False
    fp8: bool = False
    group_norm_kernel: bool = False
    narrowing_only: bool = False
    channel_sums: bool = False
    profile: bool = False
    peer: bool = False
    sdpa: tuple[str, ...] = ()  # SDPA kernels to prefer (set_sdpa_kernels), the run's --sdpa otherwise
    cudnn_benchmark: bool | None = None  # torch.backends.cudnn.benchmark for this lever (None: the run's setting)


COMPILED_LEVERS = (  # in priority order: what a window that runs out first loses least
    Lever("torch.compile default (inductor kernels, no CUDA graphs): GPU time by kernel kind", {"mode": "default"},
          90, profile=True),
    Lever("torch.compile reduce-overhead: the fast path, again in this process", {"mode": "reduce-overhead"}, 60),
    Lever("+ FP8 transformer linears (ldm.models.float8)", {"mode": "reduce-overhead"}, 90, fp8=True),
    # run 2 timed cuDNN attention only eagerly and with the mask. Run 11: no change (7.59 against 7.51 ms), as runs 5,
    # 9 and 10's profiles show PyTorch's default order already running cuDNN's sm90 kernel for these attentions
    Lever("+ SDPA prefers cuDNN attention (Hopper's fused attention), graphed", {"mode": "reduce-overhead"}, 90,
          sdpa=("cudnn",)),
    # ~1 ms of the graphed step is gaps between ~660 kernels (graphed 7.14 against 6.18 ms of GPU time, run 10):
    # Hopper's programmatic dependent launch lets a Triton kernel start while its predecessor drains; combo kernels
    # merge independent small kernels into one launch
    # tools/bench.py sets torch.backends.cudnn.benchmark (cuDNN times its algorithms per shape); ldm-txt2img
    # --compile, ldm-eval and training leave cuDNN's heuristic choice: the same fast path as they run it (run 12: equal)
    Lever("- cudnn.benchmark (cuDNN's heuristic algorithm choice, as the CLIs run), graphed",
          {"mode": "reduce-overhead"}, 60, cudnn_benchmark=False),
    Lever("+ programmatic dependent launch (inductor triton.enable_pdl), graphed",
          {"options": {"triton.cudagraphs": True, "triton.enable_pdl": True}}, 90),
    Lever("+ combo kernels (inductor combo_kernels: independent kernels merged), graphed",
          {"options": {"triton.cudagraphs": True, "combo_kernels": True}}, 90),
    Lever("torch.compile default + cuDNN attention: GPU time by kernel kind", {"mode": "default"}, 90,
          sdpa=("cudnn",), profile=True),
    # run 9's profile: normalisation took 1.36 of compile default's 6.30 ms (inductor reduces NHWC GroupNorms with
    # strided loads); ldm.models.group_norm_kernel reads whole pixels. Run 10: 3-17% slower in the step
    Lever("+ Triton GroupNorm(+SiLU) kernel (NHWC, two-phase)", {"mode": "reduce-overhead"}, 90,
          group_norm_kernel=True),
    Lever("torch.compile default + Triton GroupNorm(+SiLU) kernel: GPU time by kernel kind", {"mode": "default"}, 90,
          group_norm_kernel=True, profile=True),
    # run 10's probe: the kernel beat inductor 1.7-6.4x (3.3x over all 12) on the decoder's concatenated inputs
    # (20-80 channels a group) and lost on 320 channels, where inductor also fuses the norm's neighbours: the kernel
    # on those 12 norms only
    Lever("+ Triton GroupNorm on the decoder's concatenated inputs only (narrowing ResBlocks)",
          {"mode": "reduce-overhead"}, 90, group_norm_kernel=True, narrowing_only=True),
    Lever("torch.compile default + Triton GroupNorm on the concatenated inputs only: GPU time by kernel kind",
          {"mode": "default"}, 90, group_norm_kernel=True, narrowing_only=True, profile=True),
    # run 10's probe: inductor's GroupNorm took 98-177 us on the 640/960-channel 64x64 maps (strided group reads);
    # written as per-channel sums it reads channels contiguously and stays fusable with its neighbours
    Lever("+ GroupNorm as per-channel sums (ldm.models.channel_sums_group_norm)", {"mode": "reduce-overhead"}, 90,
          channel_sums=True),
    Lever("torch.compile default + GroupNorm as per-channel sums: GPU time by kernel kind", {"mode": "default"}, 90,
          channel_sums=True, profile=True),
    Lever("+ freezing (weights folded in as constants)", {"options": {"triton.cudagraphs": True, "freezing": True}},
          90),
    Lever("CUDA graphs alone (backend cudagraphs: eager kernels replayed)", {"backend": "cudagraphs"}, 60),
    Lever("torch.compile reduce-overhead, with the all-True context mask (kept)", {"mode": "reduce-overhead"}, 90,
          mask=True),
    Lever("torch.compile max-autotune (autotuned products and convolutions, CUDA graphs)", {"mode": "max-autotune"},
          480),
    # run 7's partial max-autotune log: Triton's convolution templates beat cuDNN by 1.1-3x on most of the U-Net's
    # shapes at batch 2; this tunes only the templated products and convolutions (no pointwise config search)
    Lever("torch.compile, tuned gemm only (max_autotune_gemm: Triton templates for products and convolutions, "
          "CUDA graphs)", {"options": {"triton.cudagraphs": True, "max_autotune_gemm": True}}, 300),
    # run 8: max-autotune's step took 10.08 ms against the fast path's 7.23-7.56 although its kernels, each timed
    # alone, predicted ~5.8-6.1 ms; this profiles the same kernel choices without CUDA graphs, by kind, to say where
    # (its name leaves out "max-autotune" so that --lever-names max-autotune still picks run 8's lever alone; last,
    # so that the older plans that run every lever reach it only after theirs)
    Lever("autotuned kernels, profiled (inductor's tuned templates, no CUDA graphs): GPU time by kernel kind",
          {"mode": "max-autotune-no-cudagraphs"}, 300, profile=True),
    # the peer "in its fastest mode": reduce-overhead, and max-autotune (never measured before run 10), each
    # in the same process as ours (the fast path varies 7.2-8.2 ms between machines)
    Lever("peer: diffusers' U-Net, torch.compile reduce-overhead", {"mode": "reduce-overhead"}, 60, peer=True),
    Lever("peer: diffusers' U-Net, torch.compile max-autotune", {"mode": "max-autotune"}, 300, peer=True),
    # run 9: in context max-autotune's templates (with GroupNorm+SiLU fused into their prologues) took 4.8 ms of
    # products and convolutions against compile default's 3.6; this keeps its choices and drops prologue fusion
    Lever("tuned templates without prologue fusion (max-autotune's options, prologue_fusion off, CUDA graphs)",
          {"options": {"max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": True,
                       "prologue_fusion": False}}, 300),
)


def _lever_options(b: Bench, lever: Lever) -> dict:
    options = {"backend": b.backend, **lever.options}
    if b.tiny:
        return {"backend": "eager"}
    if options["backend"] != "inductor":
        options.pop("mode", None)
        options.pop("options", None)
    return options


def compiled_levers(b: Bench) -> None:
    """The compiled step's levers one at a time, each while --budget-s leaves it time (after unet_step's row)."""
    unet = b.parts().unet  # fused and NHWC by unet_step
    x, t, c = b.step_inputs()
    mask = torch.ones(2, 77, dtype=torch.bool, device=b.device)
    for lever in COMPILED_LEVERS:
        if b.lever_names and not any(part in lever.name for part in b.lever_names):
            continue
        if b.seconds_left() < lever.needs_s:
            write_lever(b, lever.name, None,
                        skipped=f"{b.seconds_left():.0f} s left of --budget-s, needs ~{lever.needs_s} s")
            continue
        if lever.peer and not b.peer:
            write_lever(b, lever.name, None, skipped="diffusers is not installed (or --no-peer)")
            continue
        torch._dynamo.reset()  # the next compile starts clean (inductor's on-disk caches still help)
        cudnn_benchmark = torch.backends.cudnn.benchmark
        network, call = unet, (lambda: unet(x, t, context=c))
        if lever.mask:
            call = lambda: unet(x, t, context=c, context_mask=mask)  # noqa: E731
        started = time.monotonic()
        try:
            if lever.peer:  # diffusers' U-Net, fused and NHWC, not compiled (building it may fail: one line says so)
                network = diffusers_fast(b.peer_pipeline().unet, None)
                call = lambda: network(x, t, encoder_hidden_states=c, return_dict=False)[0]  # noqa: E731
            with torch.no_grad():
                extra = {}
                if lever.fp8:
                    to_float8(unet)
                    with eager():  # plain products, eagerly (no compile of an earlier lever runs)
                        reference = _plain_output(unet, call)
                if lever.group_norm_kernel:
                    with eager():  # the plain norms, eagerly
                        reference = call().float()
                    use_fused_group_norm(unet, narrowing_only=lever.narrowing_only)
                if lever.channel_sums:
                    with eager():
                        reference = call().float()
                    use_channel_sums_group_norm(unet)
                if lever.sdpa:
                    with eager():
                        reference = call().float()
                    set_sdpa_kernels(list(lever.sdpa))
                if lever.cudnn_benchmark is not None:
                    torch.backends.cudnn.benchmark = lever.cudnn_benchmark
                network.compile(dynamic=False, **_lever_options(b, lever))
                call()  # the compile
                extra["compile_s"] = round(time.monotonic() - started, 1)
                if lever.fp8:
                    extra["fp8_change"] = relative_l2(call(), reference)
                if lever.group_norm_kernel or lever.channel_sums:
                    extra["group_norm_change"] = relative_l2(call(), reference)
                if lever.sdpa:
                    extra["attention_change"] = relative_l2(call(), reference)
                if lever.profile and b.device.type == "cuda":
                    extra["profile"] = kernel_breakdown(call)
                ms = _step_ms(b, call)
                if lever.peer:
                    write_lever(b, lever.name, None, ms, side="peer", **extra)
                else:
                    write_lever(b, lever.name, ms, **extra)
        except Exception as e:  # noqa: BLE001  one lever failing must not lose the next
            write_lever(b, lever.name, None, error=f"{type(e).__name__}: {e}"[:2000])
        finally:
            from_float8(unet)  # the next lever runs plain products and norms (nothing to undo after the others)
            use_fused_group_norm(unet, False)
            use_channel_sums_group_norm(unet, False)
            set_sdpa_kernels(b.sdpa)
            torch.backends.cudnn.benchmark = cudnn_benchmark


def _plain_output(unet, call) -> torch.Tensor:
    """The step's output with plain (bf16) products, for the FP8 lever's change in outputs."""
    from_float8(unet)
    try:
        return call().float()
    finally:
        to_float8(unet)


def compiled_levers_alone(b: Bench) -> None:
    """The compiled levers without unet_step's row and eager levers (for a run that has those): the U-Net fused
    and NHWC first, as unet_step leaves it."""
    fast_network(b.parts().unet, mode=None)
    compiled_levers(b)


def txt2img(b: Bench, steps: int = 50, guidance: float = 7.5) -> Row:
    """One 512 px image end to end: text encoder, 50 guided DDIM steps, VAE decode, PIL image."""
    size = b.image_size
    pipe = Pipeline(b.parts(), device=b.device, dtype=b.dtype).compile(mode=b.mode, backend=b.backend)
    sides = {"ours": lambda: pipe(PROMPT, steps=steps, guidance=guidance, sampler="ddim", seed=0,
                                  height=size, width=size)}
    if b.peer:
        peer = b.peer_pipeline()
        diffusers_fast(peer.unet, b.mode, backend=b.backend)  # nothing more when unet_step made it fast already
        diffusers_fast(peer.vae.decoder, b.mode, fuse=False, backend=b.backend)
        sides["peer"] = lambda: peer(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size,
                                     width=size, generator=torch.Generator(b.device).manual_seed(0))
    with torch.no_grad():
        times = alternate(sides, b.device, warmup=2, rounds=3, repeats=2)
    flops = steps * b.unet_flops()  # the U-Net's share; the decoder and text encoder add a few per cent
    seconds = {k: v / 1000 for k, v in times.items()}
    return b.row(f"txt2img_sd15_512_{steps}steps_b1", seconds["ours"], seconds.get("peer"),
                 f"diffusers StableDiffusionPipeline (DDIM), U-Net and VAE decoder fused/channels_last/{b.compiled}",
                 "s", b.mfu(flops, times["ours"]),
                 {"steps": steps, "guidance": guidance, "sampler": "ddim", "dtype": str(b.dtype), "mode": b.mode,
                  "flops_unet_only": flops})


def train(b: Bench, resolution: int, batch: int, compile_: bool = True, record=None, *,
          both_compiled_only: bool = False) -> Row:
    """One U-Net training step on precomputed latents: fp32 weights, bf16 autocast, fused AdamW, MSE on eps.

    The eager step of both sides is timed first; with `compile_` its row goes to `record(row)` at once, so a
    compile that fails or runs out of time still leaves the eager row in the record. `both_compiled_only` skips
    the eager timing and the ours-compiled-against-the-peer-eager row (rows a run already has): both sides are
    compiled, then timed; the row is the both-compiled one.
    """
    if both_compiled_only and not (compile_ and b.peer):
        raise LdmError("--train-both-compiled needs the compiled step on both sides: drop --eager, "
                       "--no-train-compile and --no-peer (and have diffusers installed)")
    size = resolution // 8 if not b.tiny else b.image_size // 8
    unet = sd15_unet(b.device, torch.float32, tiny=b.tiny).train()
    models = {"ours": unet}
    if b.peer:
        models["peer"] = diffusers_unet(unet).train()
    if b.fp8:  # after the peer copied the weights (the keys are the same either way)
        to_float8(unet)
    g = torch.Generator(b.device).manual_seed(1)
    x = torch.randn(batch, 4, size, size, device=b.device, generator=g)
    t = torch.randint(0, 1000, (batch,), device=b.device, generator=g).float()
    c = torch.randn(batch, 77, unet.config.context_dim, device=b.device, generator=g)
    target = torch.randn(x.shape, device=b.device, generator=g)
    calls = {"ours": lambda m, n: m(x[:n], t[:n], context=c[:n]),
             "peer": lambda m, n: m(x[:n], t[:n], encoder_hidden_states=c[:n], return_dict=False)[0]}
    steps = {}
    for name, model in models.items():
        model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=b.device.type == "cuda")

        def step(n=batch, model=model, opt=opt, call=calls[name]):
            with torch.autocast(b.device.type, dtype=torch.bfloat16):
                loss = F.mse_loss(call(model, n).float(), target[:n])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    # the model's FLOPs (linear in the batch), counted before checkpointing adds its recomputation; with
    # checkpointing from one sample, as the batch it makes room for would not fit without it
    flops = count_flops(lambda: steps["ours"](1)) * batch if b.checkpointing else count_flops(steps["ours"])
    details = {"batch": batch, "resolution": resolution, "compile": compile_, "flops_per_step": flops,
               **({"fp8": "ours: transformer linears in FP8 (tensorwise e4m3 / e5m2 gradients)"} if b.fp8 else {})}
    if b.checkpointing:  # ResBlocks and transformer blocks recompute their forward in the backward, both sides
        unet.set_gradient_checkpointing(True)
        if b.peer:
            models["peer"].enable_gradient_checkpointing()
        details["activation_checkpointing"] = ("both sides (ldm's use_checkpoint, diffusers' "
                                               "enable_gradient_checkpointing); MFU counts model FLOPs only")
    if both_compiled_only:
        times, details["note"] = None, "both compiled; the eager timing and the ours-compiled row were skipped"
    else:
        times = alternate(steps, b.device, warmup=2, rounds=3, repeats=3)
        details["eager_img_s"] = {k: batch * 1000 / v for k, v in times.items()}
    if compile_ and record is not None and not both_compiled_only:
        record(_train_row(b, resolution, batch, times, flops, {**details, "compile": False,
                                                                "note": "eager, timed before the compiled step"},
                          peer_compiled=False))
    if compile_:
        try:
            details["compile_s"] = {}
            for name, model in models.items():  # ours first: its row lands even if the peer's compile runs out
                started = time.monotonic()
                if name == "ours":
                    compile_for_training(model, backend=b.backend)
                else:
                    model.compile(dynamic=False, backend=b.backend)
                steps[name]()  # the compile, forward and backward
                details["compile_s"][name] = round(time.monotonic() - started, 1)
                print(f"train_sd15_unet_{resolution}: {name} compiled in {details['compile_s'][name]} s", flush=True)
                if name == "ours" and b.peer and record is not None and not both_compiled_only:
                    ours_ms = alternate({"ours": steps["ours"]}, b.device, warmup=2, rounds=3, repeats=3)["ours"]
                    record(_train_row(b, resolution, batch, {"ours": ours_ms, "peer": times["peer"]}, flops,
                                      {**details, "note": "ours compiled, the peer still eager (its compile "
                                                          "follows in the next row)"}, peer_compiled=False))
            times = alternate(steps, b.device, warmup=3, rounds=3, repeats=3)
        except Exception as e:  # noqa: BLE001  the compiled step failed: record why, keep the eager numbers
            details["compile_error"] = "".join(traceback.format_exception_only(e)).strip()[-2000:]
            details["compile"] = False
            if times is None:  # no eager numbers to fall back on
                raise
    del models, steps, unet
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    return _train_row(b, resolution, batch, times, flops, details)


def _train_row(b: Bench, resolution: int, batch: int, times: dict, flops: int, details: dict, *,
               peer_compiled: bool | None = None) -> Row:
    ips = {k: batch * 1000 / v for k, v in times.items()}
    peer_compiled = details["compile"] if peer_compiled is None else peer_compiled
    return b.row(f"train_sd15_unet_{resolution}", ips["ours"], ips.get("peer"),
                 "diffusers UNet2DConditionModel, same step" + (" (torch.compile)" if peer_compiled else " (eager)"),
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
        fast_network(autoencoder.encoder, mode=b.mode, fuse=False, backend=b.backend)
        if b.peer:
            diffusers_fast(peer.encoder, b.mode, fuse=False, backend=b.backend)
        times = alternate(sides, b.device, warmup=3, rounds=3, repeats=5)
    ips = {k: batch * 1000 / v for k, v in times.items()}
    details["flops_per_batch"] = flops
    return b.row(f"vae_encode_{resolution}", ips["ours"], ips.get("peer"),
                 f"diffusers AutoencoderKL, channels_last, {b.compiled}", "img/s",
                 mfu_from_throughput(flops / batch, ips["ours"], b.peak_flops) if b.peak_flops else None, details)


EVAL_PEER = "diffusers StableDiffusionPipeline with a list of prompts (DDIM)"
EVAL_COMPILE_NEEDS_S = 150  # one side's U-Net and VAE decoder compiled for one batch size, then timed (estimate)


def eval_generate(b: Bench, prompts: int = 16, steps: int = 25, batches: tuple[int, ...] = (8, 16),
                  record=None) -> Row:
    """Prompt-set generation: `prompts` prompts x 25 guided steps at 512 px, each side at its best batch size.

    Both sides eagerly first (the rows of runs 1-3); then, unless `b.mode` is None (--eager), ours with the fast
    path as ldm-eval runs it on a GPU (`compile_pipeline`, `--compile auto`) and, while --budget-s lasts, the peer
    compiled too. With `record`, the eager row goes there at once and the compiled row is returned.
    """
    texts = [f"{PROMPT}, variation {i}" for i in range(prompts)]
    pipe = Pipeline(b.parts(), device=b.device, dtype=b.dtype)
    size = b.image_size
    settings = pipe.settings(steps=steps, guidance=7.5, sampler="ddim", seed=0, height=size, width=size)
    groups = {batch: [texts[i:i + batch] for i in range(0, prompts, batch)] for batch in batches}
    peer = b.peer_pipeline() if b.peer else None
    runs = {"ours": lambda batch: lambda: [to_pil(sample(pipe.stage, g, settings)) for g in groups[batch]],
            "peer": lambda batch: lambda: [
                peer(g, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                     generator=torch.Generator(b.device).manual_seed(0)) for g in groups[batch]]}
    names = ["ours", "peer"] if peer is not None else ["ours"]
    rate = lambda ms: prompts * 1000 / ms  # noqa: E731
    eager_rates: dict[str, dict[str, float]] = {name: {} for name in names}
    for batch in batches:
        with torch.no_grad(), eager():
            times = alternate({name: runs[name](batch) for name in names}, b.device, warmup=1, rounds=2, repeats=1)
        for name, ms in times.items():
            eager_rates[name][str(batch)] = rate(ms)
    details = {"prompts": prompts, "steps": steps, "batches_tried": list(batches), "compiled": False,
               "best_batch": {name: int(_best(eager_rates[name])[0]) for name in names},
               "images_s_by_batch": eager_rates}
    best = {name: _best(eager_rates[name])[1] for name in names}
    needs = 5 if b.tiny else EVAL_COMPILE_NEEDS_S

    def eager_row(extra: dict) -> Row:
        return b.row(f"eval_generate_sd15_512_{steps}steps", best["ours"], best.get("peer"), EVAL_PEER, "images/s",
                     None, {**details, **extra})

    if b.mode is None:
        return eager_row({})
    if b.seconds_left() < needs:
        return eager_row({"compiled_skipped": f"{b.seconds_left():.0f} s left of --budget-s, the compiled pass "
                                              f"needs ~{needs} s per side and batch size"})
    if record is not None:
        record(eager_row({"note": "eager, both sides (as runs 1-3); ours compiled follows in the next row"}))
    return _eval_generate_compiled(b, pipe, runs, names, batches, needs, rate, best, details)


def _best(rates: dict) -> tuple[str | None, float | None]:
    """(batch, images/s) of the fastest batch among `rates` (notes for skipped or failed batches ignored)."""
    measured = [(batch, r) for batch, r in rates.items() if isinstance(r, float)]
    return max(measured, key=lambda item: item[1]) if measured else (None, None)


def _eval_generate_compiled(b: Bench, pipe, runs, names, batches, needs, rate, eager_best, details) -> Row:
    """eval_generate's compiled pass: ours at each batch size (largest first: best eagerly in runs 1 and 3), then
    the peer; each compile is the first call of its batch size (warm-up), its seconds go to details."""
    compiled: dict[str, dict] = {name: {} for name in names}
    compile_s: dict[str, dict] = {name: {} for name in names}
    compile_pipeline(pipe, mode=b.mode, backend=b.backend)  # what `ldm-eval --compile auto` does on a GPU
    for name in names:
        if name == "peer":  # diffusers' fastest documented settings, as txt2img compiles them
            peer = b.peer_pipeline()
            diffusers_fast(peer.unet, b.mode, backend=b.backend)
            diffusers_fast(peer.vae.decoder, b.mode, fuse=False, backend=b.backend)
        for batch in sorted(batches, reverse=True):
            if b.seconds_left() < needs:
                compiled[name][str(batch)] = f"skipped: {b.seconds_left():.0f} s left of --budget-s, needs ~{needs} s"
                continue
            sides = {name: runs[name](batch)}
            if name == "peer" and isinstance(compiled["ours"].get(str(batch)), float):
                sides = {"ours": runs["ours"](batch), **sides}  # alternating with ours, the record's rule
            started = time.monotonic()
            try:
                with torch.no_grad():
                    sides[name]()  # the compile (and CUDA-graph warm-up) of this batch size
                    compile_s[name][str(batch)] = round(time.monotonic() - started, 1)
                    times = alternate(sides, b.device, warmup=2, rounds=2, repeats=1)
            except Exception as e:  # noqa: BLE001  a failed compile must not lose the other batch sizes
                compiled[name][str(batch)] = f"error: {type(e).__name__}: {e}"[:2000]
                continue
            for n, ms in times.items():
                compiled[n][str(batch)] = rate(ms)
            print(f"eval_generate compiled, {name} at batch {batch}: {rate(times[name]):.2f} images/s "
                  f"(compile {compile_s[name][str(batch)]} s)", flush=True)
    ours_batch, ours = _best(compiled["ours"])
    peer_modes, peer_batch, peer, peer_name = {}, None, None, None
    if "peer" in names:
        peer_batch, peer_compiled = _best(compiled["peer"])
        peer_modes = {"eager": eager_best["peer"], b.mode: peer_compiled if peer_compiled is not None else
                      "not measured: " + "; ".join(f"batch {k}: {v}" for k, v in compiled["peer"].items())}
        peer, peer_name = peer_compiled, f"{EVAL_PEER}, U-Net and VAE decoder fused/channels_last/{b.compiled}"
        if peer_compiled is None or eager_best["peer"] > peer_compiled:  # the peer at its best of both
            peer, peer_batch, peer_name = eager_best["peer"], details["best_batch"]["peer"], f"{EVAL_PEER}, eager"
    extra = {"compiled": ours is not None, "mode": b.mode,
             "best_batch": {"ours": None if ours_batch is None else int(ours_batch),
                            **({"peer": int(peer_batch)} if peer_batch is not None else {})},
             "images_s_by_batch": compiled, "compile_s": compile_s,
             "eager": {"images_s": eager_best, "best_batch": details["best_batch"],
                       "images_s_by_batch": details["images_s_by_batch"]},
             "note": "ours with the fast path as ldm-eval generates (compile_pipeline, --compile auto), against the "
                     "peer at its best (peer_modes)"}
    if peer_modes:
        extra["peer_modes"] = peer_modes
    if ours is None:
        extra["error"] = "no compiled batch size of ours was measured: see images_s_by_batch"
    return b.row(f"eval_generate_sd15_512_{details['steps']}steps", ours, peer, peer_name, "images/s", None,
                 {**details, **extra})


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
