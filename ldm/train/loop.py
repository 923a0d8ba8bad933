"""The training loop of a latent text-to-image diffusion model, readable top to bottom (after EDM's training_loop.py).

One optimizer step = `grad_accum` micro-batches of `data.batch_size` on each of the accelerate processes. The
noise of sample i of rank r comes from its own generator seeded by (seed, r, i): a step over batch 2b equals two
accumulated micro-steps over b, and a resumed run draws exactly the noise the uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import weakref
from pathlib import Path

import torch

from ldm.config import save_yaml, to_plain
from ldm.data.latents import check_latent_shards
from ldm.data.loader import make_loader
from ldm.diffusion.conditioning import takes_pooled_text
from ldm.errors import ConfigError, LdmError
from ldm.eval.clip_score import ClipModel, check_clip_weights
from ldm.eval.frechet import load_stats
from ldm.eval.grid import make_grid
from ldm.eval.in_training import evaluate_generations
from ldm.eval.inception import EXTRACTOR_NAME as INCEPTION_NAME
from ldm.eval.inception import FEATURE_DIM, InceptionExtractor, resolve_inception_weights, stats_space
from ldm.eval.prompts import load_prompts
from ldm.io.native_format import export_native
from ldm.models.attention import set_attention_backend
from ldm.models.float8 import FP8_ALIGN, check_fp8_device, to_float8, transformer_linears
from ldm.models.text_encoders import TextEmbeddings
from ldm.runtime import derive_seed
from ldm.train.batches import DataCounts, TrainState, batch_stream, stream_settings
from ldm.train.checkpointing import accelerate_files, export_failures, resolve_resume, save_checkpoint, start_state
from ldm.train.compiled import compile_for_training
from ldm.train.config import ModelConfig, TrainConfig
from ldm.train.ema import EMA
from ldm.train.model import (DiffusionObjective, LatentDiffusionParts, build_parts, build_unet, check_latent_batch,
                             encode_captions, latents_from_posterior, text_conditioning)
from ldm.train.optim import lr_at, make_optimizer, set_lr
from ldm.train.run_folder import open_run
from ldm.train.samples import check_preview_settings, sample_images, upscale_references
from ldm.train.latent_upscale import latent_upscale_inputs
from ldm.train.sharding import finish_wrapping, is_sharded, set_wrap_units, unsharded_parts
from ldm.train.super_resolution import super_resolution_inputs
from ldm.train.tracking import RunLogger

TRAIN_CONFIG = "train_config.yaml"  # the resolved run config; DIR/config.yaml is the exported model's (native format)


def randn_per_sample(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`b *shape` standard normal noise, row i from generator i."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


@torch.no_grad()
def prepare_inputs(batch: dict, parts: LatentDiffusionParts, objective: DiffusionObjective, config: TrainConfig,
                   state: TrainState, rank: int, device: torch.device) -> dict:
    """A loader batch -> the objective's arguments: clean latents x0, sigma, noise, and cond or captions."""
    captions = list(batch["caption"])
    seeds = [derive_seed(config.seed, rank, state.samples + j) for j in range(len(captions))]
    state.samples += len(captions)
    extra = {}  # network arguments besides the text: an SR stage's low-res image and augmentation level
    if parts.autoencoder is None and config.loss.inputs == "latents":  # a pixel model's shards hold the images
        check_latent_batch(batch, pixels=True)
        batch = {**batch, "image": batch["latent_mean"]}
    if parts.super_resolution:  # made from the sample itself: an SR stage trains without a base model
        mean, std = batch["image"].float(), None
        mean, extra = super_resolution_inputs(mean, parts.stage, [derive_seed(s, "sr") for s in seeds], device)
    elif parts.latent_upscale is not None:  # the x4 upscaler: its low-res input made from the sample itself
        if config.loss.inputs == "latents":
            raise LdmError("a latent upscaler trains from images (its low-res input is made from each one): set "
                           "loss.inputs=images")
        extra = latent_upscale_inputs(batch["image"], parts.latent_upscale, parts.codec.downsample_factor,
                                      [derive_seed(s, "latent-upscale") for s in seeds], device)
        posterior = parts.autoencoder.encode(batch["image"].to(device))
        mean, std = posterior.mean.float(), posterior.std.float()
    elif parts.autoencoder is None:  # a pixel-space model: its x0 is the image (no posterior to draw from)
        mean, std = batch["image"].to(device).float(), None
    elif config.loss.inputs == "latents":
        check_latent_batch(batch)
        mean, std = batch["latent_mean"].to(device).float(), batch["latent_std"].to(device).float()
    else:
        posterior = parts.autoencoder.encode(batch["image"].to(device))
        mean, std = posterior.mean.float(), posterior.std.float()
    # Per-sample generators: noise on the device, sigma on the CPU (one copy per batch, no sync per sample).
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    sigma = torch.cat([objective.sigma_sampler(1, generator=torch.Generator().manual_seed(s)) for s in seeds])
    shape = tuple(mean.shape[1:])  # c h w
    x0 = mean if std is None else latents_from_posterior(parts.autoencoder.config, mean, std,
                                                         randn_per_sample(generators, shape, device))
    noise = randn_per_sample(generators, shape, device)
    if config.loss.offset_noise:  # a per-channel constant shift teaches the model to change mean brightness
        noise = noise + config.loss.offset_noise * randn_per_sample(generators, (shape[0], 1, 1), device)
    inputs = dict(x0=x0, sigma=sigma.to(device, torch.float32), noise=noise)
    names = getattr(parts.unet.config, "micro_conditioning", ())
    if names:  # SDXL: the sizes and crop of each sample, as the loader measured them
        extra["micro"] = micro_from_batch(batch, names).to(device)
    if parts.train_text_encoder:
        return {**inputs, "captions": captions, "cond": extra or None}
    if config.loss.inputs == "latents":
        cond = latent_text_conditioning(batch, parts, device)
    else:
        cond = text_conditioning(encode_captions(parts.text_encoder, captions), parts.unet.config)
    return {**inputs, "cond": {**{k: v.to(device) for k, v in cond.items()}, **extra}}


def micro_from_batch(batch: dict, names: tuple[str, ...]) -> torch.Tensor:
    """`b k` micro-conditioning numbers from the loader's `micro` (original h w, crop top left, target h w)."""
    if "micro" not in batch:
        raise LdmError(f"this U-Net is micro-conditioned on {list(names)} but the loader gave no `micro` sizes; "
                       "latent shards made before SDXL support lack them: precompute them again")
    columns = {"original_size": [0, 1], "crops_coords_top_left": [2, 3], "target_size": [4, 5]}
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise LdmError(f"training on {unknown} is not supported: the data gives sizes and crops, not "
                       f"{', '.join(unknown)} (the refiner's aesthetic score)")
    return batch["micro"].float()[:, [c for n in names for c in columns[n]]]


_EMPTY_PROMPT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # frozen text encoder -> its "" embedding


def empty_prompt_embedding(text_encoder: torch.nn.Module):
    """The frozen encoder's embedding of "" (what caption dropout swaps in), encoded once per encoder."""
    if text_encoder not in _EMPTY_PROMPT:
        _EMPTY_PROMPT[text_encoder] = text_encoder.encode([""])
    return _EMPTY_PROMPT[text_encoder]


def latent_text_conditioning(batch: dict, parts: LatentDiffusionParts, device: torch.device) -> dict:
    """Precomputed text embeddings -> U-Net arguments; the loader's caption-dropout rows get the empty prompt's."""
    tokens = batch["text_tokens"].to(device).float()
    mask, pooled = batch.get("text_mask"), batch.get("text_pooled")
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.to(device)
    pooled = None if pooled is None else pooled.to(device).float()
    if takes_pooled_text(parts.unet.config) and pooled is None:
        raise LdmError("loss.inputs=latents with a U-Net taking pooled text (adm_in_channels) needs `text_pooled` "
                       "from the loader; precompute the latents with a text encoder that has a pooled output")
    dropped = batch.get("drop_mask")
    if dropped is not None and bool(dropped.any()):
        empty, rows = empty_prompt_embedding(parts.text_encoder), dropped.to(device)
        tokens = torch.where(rows[:, None, None], empty.tokens.to(device, tokens.dtype), tokens)
        mask = torch.where(rows[:, None], empty.mask.to(device), mask)
        if pooled is not None:
            pooled = torch.where(rows[:, None], empty.pooled.to(device, pooled.dtype), pooled)
    return text_conditioning(TextEmbeddings(tokens, pooled, mask), parts.unet.config)


def check_fp8_unet(model: ModelConfig) -> None:
    """Refuse `fp8: true` for a U-Net without transformer linears, from its config alone: built on the meta device
    (no memory, no random numbers drawn), before anything is written. A U-Net taken from a whole model
    (`pretrained.unet` a folder or hub id) has that model's config, known only once loaded: `to_float8` judges it."""
    if model.pretrained.unet is not None and not Path(model.pretrained.unet).is_file():
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        unet = build_unet(model)
    if not transformer_linears(unet):
        raise LdmError(f"fp8: true, but model.unet ({type(unet).__name__}) has no transformer linear layers whose "
                       f"widths are multiples of {FP8_ALIGN}: FP8 has nothing to run on; set fp8: false")


def check_evaluation(s) -> None:
    """The in-training evaluation's settings (`sampling.eval_prompts` and what it needs), checked before any work:
    they are first used at the first sample grid, after training steps, at the end of the run (before the export)
    when `sampling.every` is 0. Files are read (prompts, statistics); the CLIP model is built only at the grid."""
    if not s.eval_prompts or not s.prompts or not (s.every or s.at_end):
        return
    if s.clip_pretrained is None:
        raise ConfigError("sampling.eval_prompts needs sampling.clip_pretrained (a tag, a weights file, or 'none')")
    load_prompts(s.eval_prompts)
    try:
        check_clip_weights(s.clip_model, s.clip_pretrained)
    except LdmError as e:  # the evaluation CLIs' flag is this run's config key
        raise ConfigError(str(e).replace("--clip-pretrained", "sampling.clip_pretrained", 1)) from e
    if s.ref_stats:
        ref = load_stats(s.ref_stats)
        if not ref.extractor.startswith("clip:"):  # Inception statistics: FID needs the Inception weights
            # the grids' FID is of the default resizer's 2048-d features (as ldm-fid and ldm-eval check up front)
            if (stats_space(ref), ref.dim) != (INCEPTION_NAME, FEATURE_DIM):
                raise ConfigError(f"sampling.ref_stats={s.ref_stats}: holds {ref.dim}-d statistics of "
                                  f"{stats_space(ref)!r}, but the in-training FID measures {INCEPTION_NAME!r} "
                                  f"({FEATURE_DIM}-d, the default resizer); make them with ldm-fid REF --save-stats")
            resolve_inception_weights(s.inception_weights)


def check_training_sizes(config: TrainConfig, parts: LatentDiffusionParts) -> None:
    """The image sizes the loader makes (data.resolution or data.buckets) must be multiples of the codec's factor
    times the U-Net's downsampling, as `Stage.factor` says for sampling; else the U-Net's skip connections fail to
    concatenate at the first step, deep in the forward pass."""
    if config.loss.inputs == "latents":  # the shards hold latents of their own size
        return
    own = getattr(parts.unet.config, "downsample_factor", None)  # the Efficient U-Net's
    levels = getattr(parts.unet.config, "channel_mult", None)
    if own is None and levels is None:
        return
    factor = parts.codec.downsample_factor * (own or 2 ** (len(levels) - 1))
    bad = [(h, w) for h, w in config.data.sizes if h % factor or w % factor]
    if bad:
        key = "data.buckets" if config.data.buckets else "data.resolution"
        h, w = bad[0]
        raise ConfigError(f"{key}: {h}x{w} is not a multiple of {factor} (the autoencoder's factor "
                          f"{parts.codec.downsample_factor} times the U-Net's downsampling); try "
                          f"{max(factor, round(h / factor) * factor)}")


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the model of `config` into `config.output_dir`; returns that folder, which then holds the final model.

    A fresh run needs an empty folder; `resume` ("latest" or a checkpoint folder) continues the run there and
    `overwrite` deletes it first.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    out = Path(config.output_dir)
    check_evaluation(config.sampling)
    if config.fp8:  # before the run folder exists: a refused run leaves nothing behind
        check_fp8_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
        check_fp8_unet(config.model)
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun on CPUs
    accelerator = open_run(
        out, resume, overwrite,
        cpu=multi_cpu,  # without it accelerate runs each CPU process alone (DistributedType.NO)
        mixed_precision=config.mixed_precision,  # autocast in the wrapped forward; weights stay float32
        log_with=config.log_with,
        shards=[config.data.shards],
        # DDP as measured in docs/multi-gpu.md: 100 MB buckets, gradients viewed in place (no extra copy)
        kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=100, gradient_as_bucket_view=True)],
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    set_attention_backend(config.attention_backend)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # The model: identical random init on every rank (DDP broadcasts rank 0's weights anyway).
    torch.manual_seed(config.seed)
    parts = build_parts(config.model)
    check_training_sizes(config, parts)
    if config.sampling.every or config.sampling.at_end:
        check_preview_settings(parts, config.sampling)
    if config.fp8:  # before compiling: the compiled graph holds the FP8 products
        to_float8(parts.unet)  # in place: parameters and state_dict keys are unchanged
    if config.compile if config.compile is not None else device.type == "cuda":
        compile_for_training(parts.unet)  # in place: state_dict keys, EMA and checkpoints are unchanged
    if config.data.sample_format == "latent":  # precomputed shards: refuse ones made by other encoders, at once

        if config.loss.inputs != "latents":
            raise LdmError("data.sample_format=latent gives precomputed latents: set loss.inputs=latents")
        check_latent_shards(config.data, parts.autoencoder, parts.text_encoder)
    objective = DiffusionObjective(parts, config.loss)
    if is_sharded(accelerator):  # FSDP2 (the accelerate config): the U-Net and its blocks are the units
        set_wrap_units(accelerator, objective)
    optimizer = make_optimizer(objective.parameters(), config.optim, device)
    model, optimizer = accelerator.prepare(objective, optimizer)
    if is_sharded(accelerator):
        accelerator.print(f"FSDP2 over {accelerator.num_processes} ranks, units: {finish_wrapping(objective)}")
    ema = None
    if config.ema.enabled:  # on the unwrapped parameters, never DDP's; under FSDP on this rank's slices
        e = config.ema
        ema = EMA(objective, e.decay, warmup=e.warmup, inv_gamma=e.inv_gamma, power=e.power).to(device)
    parts.codec.to(device)  # float32 weights: the exported model keeps the pretrained precision
    parts.text_encoder.to(device)

    # The data: not passed to accelerator.prepare (it would re-split the webdataset stream); batches moved here.
    loader = make_loader(config.data, rank=rank, world_size=world)
    checkpoint = resolve_resume(out, resume, accelerate_files(accelerator))
    state = start_state(accelerator, checkpoint, ema, out, config.max_steps,
                        stream_settings(config.data, loader.urls, world))
    # Recorded once the shards are found and the checkpoint restored: a refused start (a checkpoint of another
    # model config) leaves the folder, or its run's record, as it was; a new folder is not told it holds a run.
    resolved = {**to_plain(config), "model": {**to_plain(config.model), **parts.resolved()}}
    if accelerator.is_main_process:
        save_yaml(resolved, out / TRAIN_CONFIG)
    batches = batch_stream(loader, state)
    logger = RunLogger(accelerator, config.log_with, out)
    latent_size = config.data.resolution // parts.codec.downsample_factor  # of the sample grids

    saved_step = state.step if checkpoint is not None else None
    # An SR stage's preview inputs: the run's first training images (epoch 0, batch 0), read again by a resumed run
    # so that its grids are the uninterrupted run's.
    references = None
    if parts.upscales and checkpoint is not None and (config.sampling.every or config.sampling.at_end):
        loader.set_epoch(0)
        first = iter(loader)
        references = preview_references(next(first), config)
        first.close()  # its worker processes end here

    def checkpoint_now() -> None:
        nonlocal saved_step
        data_counts.sync(accelerator, state)  # into the checkpoint; the pending loss stays for its log line
        save_checkpoint(accelerator, out, state.step, dataclasses.asdict(state), ema, config.checkpoints_total_limit)
        saved_step = state.step

    pending = torch.zeros(1, device=device)  # loss sum since the last log (this rank)
    data_counts = DataCounts()  # samples the loader skipped or filtered since the last sync (this rank)
    loss_count, timer_start, timer_step = 0, time.perf_counter(), state.step

    def sync_counts() -> torch.Tensor:
        """Sum the pending loss and data counts over ranks (a collective: every rank calls it at the same steps)."""
        nonlocal pending
        total = accelerator.reduce(pending.clone(), reduction="sum")
        data_counts.sync(accelerator, state)
        pending = torch.zeros_like(pending)
        return total

    progress = None
    if config.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=state.step, desc="train", unit="step")

    model.train()
    while state.step < config.max_steps:
        lr = lr_at(state.step, config.optim, config.max_steps)
        set_lr(optimizer, lr)
        for micro in range(config.grad_accum):
            batch = next(batches)
            data_counts.add(batch)
            if parts.upscales and references is None:  # the SR grid upscales these training images
                references = preview_references(batch, config)
            with accelerator.autocast():  # the frozen encoders run in the autocast dtype, their weights stay float32
                inputs = prepare_inputs(batch, parts, objective, config, state, rank, device)
            last = micro == config.grad_accum - 1
            with accelerator.no_sync(model) if not last else contextlib.nullcontext():  # all-reduce once per step
                loss = model(**inputs).mean()
                accelerator.backward(loss / config.grad_accum)
            pending[0] += loss.detach().float()
            loss_count += 1
        grad_norm = None
        if config.optim.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(objective.parameters(), config.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(objective)
        state.step += 1
        if progress is not None:
            progress.update(1)

        if state.step % config.log_every == 0 or state.step == config.max_steps:
            total = sync_counts()
            elapsed = time.perf_counter() - timer_start
            images = (state.step - timer_step) * config.grad_accum * config.data.batch_size * world
            values = {"loss": float(total[0]) / max(1, loss_count * world), "lr": lr, "img_per_s": images / elapsed,
                      **state.data_counts(), "epoch": state.epoch}
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            if ema is not None:
                values["ema_decay"] = ema.current_decay()
            if device.type == "cuda":  # DDP vs FSDP: what each GPU held at most (docs/multi-gpu.md)
                values["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if not math.isfinite(values["loss"]):
                raise LdmError(f"the loss became {values['loss']} at step {state.step}; lower optim.lr, or use "
                               "mixed_precision=bf16 instead of fp16")
            logger.scalars(values, state.step)
            if progress is not None:
                progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.1f}",
                                     skipped=state.skipped)
            else:  # headless runs (batch jobs) get a plain line instead of the bar
                memory = f" peak_mem_gib {values['peak_mem_gib']:.2f}" if "peak_mem_gib" in values else ""
                accelerator.print(f"step {state.step} loss {values['loss']:.4f} lr {lr:.3g} "
                                  f"img/s {values['img_per_s']:.1f} skipped {state.skipped}{memory}")
            loss_count, timer_start, timer_step = 0, time.perf_counter(), state.step
        sampled = bool(config.sampling.every) and state.step % config.sampling.every == 0
        if sampled:
            log_samples(parts, ema, objective, config, latent_size, device, logger, state.step, accelerator,
                        references)
        if state.step % config.checkpoint_every == 0:
            checkpoint_now()
        if sampled or state.step % config.checkpoint_every == 0:  # img/s measures training, not these pauses
            timer_start, timer_step = time.perf_counter(), state.step

    # The end: a checkpoint (so `--max-steps` can grow and `--resume latest` go on), samples, the EMA model.
    if progress is not None:
        progress.close()
    if saved_step != state.step:
        checkpoint_now()
    check_replicas_in_sync(accelerator, objective)
    if config.sampling.at_end:
        log_samples(parts, ema, objective, config, latent_size, device, logger, state.step, accelerator,
                        references)
    export_model(parts, ema, objective, out, state.step, accelerator)
    accelerator.wait_for_everyone()
    logger.close()
    return out


def preview_references(batch: dict, config: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The training images (and captions) of `batch` an SR stage's preview grid upscales."""
    count = min(len(batch["caption"]), len(config.sampling.prompts) * config.sampling.n_per_prompt)
    images = batch["image"] if "image" in batch else batch["latent_mean"]  # precomputed: the images
    return images[:count].float().clone(), list(batch["caption"][:count])


def parameter_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """Two float64 numbers that differ when any trained parameter differs: the sum and a position-weighted sum."""
    total = torch.zeros(2, dtype=torch.float64)
    offset = 0
    for p in module.parameters():
        if p.requires_grad:
            flat = p.detach().double().flatten().cpu()
            weights = torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64) % 9973
            total += torch.stack([flat.sum(), (flat * weights).sum()])
            offset += flat.numel()
    return total


def check_replicas_in_sync(accelerator, objective: torch.nn.Module) -> None:
    """Under DDP every rank must end with identical weights; say so in the log, and fail loudly if not."""
    if accelerator.num_processes == 1:
        return
    if is_sharded(accelerator):
        accelerator.print(f"parameters sharded over {accelerator.num_processes} ranks (FSDP): one copy, no replicas")
        return
    mine = parameter_fingerprint(objective).to(accelerator.device)
    every = accelerator.gather(mine[None]).cpu()
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError(f"DDP replicas diverged: parameter fingerprints per rank {every.tolist()}")
    accelerator.print(f"parameters identical on all {accelerator.num_processes} ranks (fingerprint "
                      f"{every[0, 0].item():.6e}, {every[0, 1].item():.6e})")


def _ema_weights(ema: EMA | None, objective: DiffusionObjective):
    return ema.swapped_in(objective) if ema is not None else contextlib.nullcontext()


def log_samples(parts, ema, objective, config, latent_size, device, logger, step, accelerator,
                references: tuple | None = None) -> None:
    """A grid of EMA samples for the configured prompts (and the evaluation metrics), drawn on the main process.

    An SR stage upscales `references` (training images and their captions) instead: rows low-res | SR | truth.
    Under FSDP every rank samples too (each U-Net unit gathers its weights from all ranks); only the main one logs.
    """
    if not (accelerator.is_main_process or is_sharded(accelerator)) or not config.sampling.prompts:
        return
    if parts.super_resolution and references is None:  # resumed at its last step: no training image read to upscale
        return

    s = config.sampling
    if references is not None:
        with _ema_weights(ema, objective), accelerator.autocast():
            images = upscale_references(parts, *references, s, device)
        logger.grid("samples", make_grid(images, ncols=3, captions=[c for c in references[1] for _ in range(3)]),
                    step)
        return
    prompts = [p for p in s.prompts for _ in range(s.n_per_prompt)]
    with _ema_weights(ema, objective), accelerator.autocast():
        images = sample_images(parts, prompts, s, latent_size, device)
    logger.grid("samples", make_grid(images, ncols=s.n_per_prompt, captions=prompts), step)
    if s.eval_prompts:
        evaluate_in_training(parts, ema, objective, s, latent_size, device, logger, step, accelerator)


_EVALUATORS: dict = {}  # the CLIP model and reference statistics, loaded once per run


def evaluate_in_training(parts, ema, objective, s, latent_size, device, logger, step, accelerator) -> None:
    """Generate the evaluation prompt set with the EMA weights; log its CLIP score (and FID / FD_CLIP) and grid."""

    key = (s.eval_prompts, s.clip_model, s.clip_pretrained, s.ref_stats)
    if key not in _EVALUATORS:
        ref = load_stats(s.ref_stats) if s.ref_stats else None
        inception = None
        if ref is not None and not ref.extractor.startswith("clip:"):  # Inception statistics: FID

            inception = InceptionExtractor(s.inception_weights, device=device)
        texts = [p.text for p in load_prompts(s.eval_prompts)][: s.eval_max_prompts]
        _EVALUATORS.clear()
        _EVALUATORS[key] = (ClipModel(s.clip_model, s.clip_pretrained, device=device), ref, inception, texts)
    clip, ref, inception, texts = _EVALUATORS[key]

    def generate(batch: list[str]):
        with _ema_weights(ema, objective), accelerator.autocast():
            return sample_images(parts, batch, s, latent_size, device)

    metrics, grid = evaluate_generations(generate, texts, clip, ref_stats=ref, fid_extractor=inception)
    logger.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
    logger.grid("eval", grid, step)
    accelerator.print(f"step {step} eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def export_model(parts, ema, objective, out: Path, step: int | None = None, accelerator=None) -> None:
    """Write the EMA weights in the native format into `out` (main process), loadable with `ldm-txt2img --model out`.

    Under FSDP every rank calls it: the sharded networks are gathered into whole copies on the main process.
    """
    main = accelerator is None or accelerator.is_main_process
    with _ema_weights(ema, objective):
        if accelerator is not None and is_sharded(accelerator):
            parts = unsharded_parts(parts, keep=main)
        if main:
            with export_failures(out):
                export_native(parts.model_parts(source=str(out)), out, step=step)
