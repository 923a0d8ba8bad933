"""Training the KL autoencoder of latent diffusion: two optimizers (autoencoder, discriminator), one loop to read.

Each optimizer step: the autoencoder reconstructs a batch (posterior sample with a noise seed fixed by (seed, rank,
step), so a resumed run draws what the uninterrupted one would), takes NLL + KL (+ GAN from `loss.disc_start`) and
steps; then the discriminator steps on the same batch and the detached reconstruction (from `disc_start` only, so
before it its weights do not move). The run ends with a checkpoint, validation (PSNR, rFID when Inception weights
are present), and `autoencoder.safetensors` + `autoencoder.yaml` whose scale_factor is 1 / std of the latents
(Rombach et al. 2022, sec. 4.3.2 / app. G): point a diffusion config's `model.pretrained.autoencoder` at the first
and copy the second into its `model.autoencoder`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image
from torch import nn

from ldm.atomic import atomic_write_text
from ldm.config import from_dict, load_yaml, save_yaml, to_plain
from ldm.data.config import DataConfig
from ldm.data.loader import make_loader
from ldm.errors import ConfigError, LdmError
from ldm.eval.features import compute_features
from ldm.eval.frechet import fid
from ldm.eval.grid import make_grid
from ldm.eval.inception import InceptionExtractor, resolve_inception_weights
from ldm.io.checkpoint import load_into, read_state_dict, write_safetensors
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.pipeline.images import to_pil
from ldm.runtime import derive_seed
from ldm.train.autoencoder_loss import AutoencoderLoss, AutoencoderLossConfig
from ldm.train.batches import DataCounts, batch_stream, stream_settings
from ldm.train.checkpointing import accelerate_files, export_failures, resolve_resume, save_checkpoint, start_state
from ldm.train.config import EMAConfig, OptimConfig
from ldm.train.ema import EMA
from ldm.train.optim import lr_at, make_optimizer, set_lr
from ldm.train.run_folder import open_run
from ldm.train.tracking import RunLogger

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class ValidationConfig:
    """Held-out images: PSNR and rFID of reconstructions (posterior mode), and the images of the grids."""

    shards: str | list[str] = ""  # "" = no validation set (grids then show the first training batch)
    max_images: int = 256
    batch_size: int = 16
    every: int = 0  # optimizer steps between validations; 0 = at the end only
    rfid: bool = True  # needs torch-fidelity and the Inception weights (ldm.eval.inception); skipped with a note otherwise
    inception_weights: str | None = None  # None = $LDM_INCEPTION_WEIGHTS or torch hub's cache; never downloaded here
    grid_images: int = 8  # originals over reconstructions in each grid


@dataclass
class VAETrainConfig:
    """Everything `tools/train_vae.py --config X.yaml key=value ...` needs."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    pretrained: str | None = None  # start from these autoencoder weights (native keys or a whole SD checkpoint)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # Adam(0.5, 0.9) without clipping, as taming / CompVis (lr there: 4.5e-6 x total batch size)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4.5e-6, betas=(0.5, 0.9), weight_decay=0.0,
                                                                   max_grad_norm=None))
    disc_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4.5e-6, betas=(0.5, 0.9), weight_decay=0.0,
                                                                        max_grad_norm=None))
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    output_dir: str = "runs/vae"
    max_steps: int = 1000
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    seed: int = 0
    checkpoint_every: int = 1000
    checkpoints_total_limit: int | None = 3
    log_every: int = 50
    grid_every: int = 0  # optimizer steps between reconstruction grids; 0 = at the end only
    log_with: str = "tensorboard"  # "tensorboard" | "wandb" | "none"
    scale_batches: int = 8  # training batches whose latents set scale_factor at the end
    allow_tf32: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.max_steps < 0 or self.checkpoint_every < 1 or self.log_every < 1 or self.scale_batches < 1:
            raise ConfigError("max_steps must be >= 0; checkpoint_every, log_every and scale_batches >= 1")


class AutoencoderTrainee(nn.Module):
    """What DDP wraps and the autoencoder optimizer trains: the autoencoder and the output log-variance."""

    def __init__(self, autoencoder: AutoencoderKL, learn_logvar: bool = False, logvar_init: float = 0.0):
        super().__init__()
        self.autoencoder = autoencoder
        if learn_logvar:
            self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        else:
            self.register_buffer("logvar", torch.tensor(float(logvar_init)))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction, posterior, logvar); logvar is returned so that DDP sees it used in the forward."""
        rec, posterior = self.autoencoder(x, sample_posterior=True, generator=generator)
        return rec, posterior, self.logvar


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, `b`, for images in [-1, 1] (peak 1 after mapping to [0, 1])."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20))


def estimate_scale_factor(latents: Iterable[torch.Tensor]) -> float:
    """1 / std of all latent elements (unbiased, float64 running sums), LDM's scale_factor for unit-variance latents."""
    n, s1, s2 = 0, 0.0, 0.0
    for z in latents:
        z = z.detach().double()
        n, s1, s2 = n + z.numel(), s1 + float(z.sum()), s2 + float(z.pow(2).sum())
    if n < 2:
        raise LdmError("estimate_scale_factor needs at least 2 latent values")
    var = (s2 - s1 * s1 / n) / (n - 1)
    return 1.0 / math.sqrt(max(var, 1e-20))


def validation_images(config: VAETrainConfig) -> Iterator[torch.Tensor]:
    """Batches of the held-out set, one pass, centre crops, at most `validation.max_images` images."""
    v = config.validation
    data = dataclasses.replace(config.data, shards=v.shards, batch_size=v.batch_size, resampled=False, crop="center",
                               flip_prob=0.0, shuffle_buffer=0, caption_dropout=0.0, buckets=None)
    seen = 0
    for batch in make_loader(data, rank=0, world_size=1):
        x = batch["image"][: v.max_images - seen]
        seen += x.shape[0]
        yield x
        if seen >= v.max_images:
            return


@torch.no_grad()
def reconstruct(autoencoder: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction through the posterior mode, clamped to [-1, 1]."""
    return autoencoder.decode(autoencoder.encode(x).mode()).float().clamp(-1, 1)


@torch.no_grad()
def validate(autoencoder: AutoencoderKL, config: VAETrainConfig, device: torch.device, autocast) -> dict[str, float]:
    """PSNR (mean over images) and, when possible, rFID of the held-out reconstructions."""
    psnrs, reals, recs = [], [], []
    for x in validation_images(config):
        x = x.to(device)
        with autocast():
            y = reconstruct(autoencoder, x)
        psnrs.append(psnr(x, y).cpu())
        if config.validation.rfid:
            reals += to_pil(x, check=False)
            recs += to_pil(y, check=False)
    if not psnrs:
        raise LdmError(f"validation.shards={config.validation.shards!r} yielded no images")
    metrics = {"val/psnr": float(torch.cat(psnrs).mean()), "val/images": float(sum(len(p) for p in psnrs))}
    if config.validation.rfid:
        value = reconstruction_fid(reals, recs, config.validation.inception_weights, device)
        if value is not None:
            metrics["val/rfid"] = value
    return metrics


def reconstruction_fid(reals: list[Image.Image], recs: list[Image.Image], weights: str | None,
                       device: torch.device) -> float | None:
    """FID between real and reconstructed images (ldm.eval); None with a warning when Inception is unavailable."""
    try:
        extractor = InceptionExtractor(resolve_inception_weights(weights, download=False), device=device)
    except (ImportError, LdmError) as e:
        warnings.warn(f"rFID skipped: {e}", stacklevel=2)
        return None
    stats = [compute_features(images, extractor, keep=False, progress=False).sums.to_stats(extractor.name)
             for images in (reals, recs)]
    return fid(*stats)


def export_autoencoder(autoencoder: AutoencoderKL, scale_factor: float, out: Path) -> None:
    """`out/autoencoder.safetensors` (native keys) and `out/autoencoder.yaml` (its AutoencoderConfig, measured scale)."""
    config = dataclasses.replace(autoencoder.config, scale_factor=scale_factor)
    write_safetensors(autoencoder.state_dict(), out / "autoencoder.safetensors",
                      metadata={"format": "ldm-native-autoencoder", "config": to_plain(config)})
    save_yaml(to_plain(config), out / "autoencoder.yaml")


def load_autoencoder(folder: str | Path) -> AutoencoderKL:
    """The autoencoder a run exported into `folder` (autoencoder.yaml + autoencoder.safetensors)."""
    folder = Path(folder)
    model = AutoencoderKL(from_dict(AutoencoderConfig, load_yaml(folder / "autoencoder.yaml"), where="autoencoder.yaml"))
    return load_into(model, read_state_dict(folder / "autoencoder.safetensors"), source=str(folder))


def load_pretrained(autoencoder: AutoencoderKL, path: str) -> AutoencoderKL:
    """Weights to fine-tune from: native keys, or the `first_stage_model.` part of a whole SD checkpoint."""
    sd = read_state_dict(path)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return load_into(autoencoder, sd, source=f"pretrained={path}")


def first_images(config: VAETrainConfig) -> torch.Tensor:
    """The grid's images: the first held-out ones, else the first batch of the training stream's epoch 0."""
    if config.validation.shards:
        x = next(validation_images(config))
    else:
        x = next(iter(make_loader(config.data, rank=0, world_size=1)))["image"]
    return x[: config.validation.grid_images]


def as_run(config: VAETrainConfig, objective: AutoencoderLoss) -> tuple[VAETrainConfig, list[str]]:
    """The config that actually runs (LPIPS weights absent: perceptual_weight 0), and a note per change."""
    if config.loss.perceptual_weight > 0 and objective.lpips is None:
        loss = dataclasses.replace(config.loss, perceptual_weight=0.0)
        note = (f"trained without the perceptual loss: no LPIPS weights were found (perceptual_weight "
                f"{config.loss.perceptual_weight} was asked for; see loss.lpips_weights)")
        return dataclasses.replace(config, loss=loss), [note]
    return config, []


def train_autoencoder(config: VAETrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the autoencoder of `config` into `config.output_dir`; returns the folder holding the exported model.

    A fresh run needs an empty folder; `resume` continues the run there and `overwrite` deletes it first.
    """
    out = Path(config.output_dir)
    accelerator = open_run(out, resume, overwrite, mixed_precision=config.mixed_precision, log_with=config.log_with,
                           shards=[config.data.shards, *([config.validation.shards] if config.validation.shards else [])])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Networks: the same seeded init on every rank; the discriminator is built (and seeded) after the autoencoder.
    torch.manual_seed(config.seed)
    autoencoder = AutoencoderKL(config.model)
    if config.pretrained:
        load_pretrained(autoencoder, config.pretrained)
    trainee = AutoencoderTrainee(autoencoder, config.loss.learn_logvar, config.loss.logvar_init)
    objective = AutoencoderLoss(config.loss, in_channels=config.model.out_ch)
    config, notes = as_run(config, objective)
    ema = None
    if config.ema.enabled:  # over the unwrapped autoencoder's parameters
        e = config.ema
        ema = EMA(autoencoder, e.decay, warmup=e.warmup, inv_gamma=e.inv_gamma, power=e.power).to(device)
    opt_ae = make_optimizer(trainee.parameters(), config.optim, device)
    opt_d = make_optimizer(objective.discriminator.parameters(), config.disc_optim, device)
    # Order matters for save_state/load_state: model_0 = trainee, model_1 = discriminator, then the optimizers.
    trainee_w, disc_w, opt_ae, opt_d = accelerator.prepare(trainee, objective.discriminator, opt_ae, opt_d)
    objective.to(device)  # the frozen LPIPS network
    last_layer = autoencoder.decoder.conv_out.weight  # the adaptive GAN weight compares gradients here

    loader = make_loader(config.data, rank=rank, world_size=world)  # not prepared: the stream is already per-rank
    checkpoint = resolve_resume(out, resume, accelerate_files(accelerator))
    state = start_state(accelerator, checkpoint, ema, out, config.max_steps,
                        stream_settings(config.data, loader.urls, world))
    if accelerator.is_main_process:  # once the checkpoint is restored: a refused --resume leaves the run's record alone
        save_yaml(to_plain(config), out / "config.yaml")
    saved_step = state.step if checkpoint is not None else None
    batches = batch_stream(loader, state)
    data_counts = DataCounts()  # samples the loader skipped or filtered since the last sync (this rank)

    def checkpoint_now() -> None:
        nonlocal saved_step
        data_counts.sync(accelerator, state)
        save_checkpoint(accelerator, out, state.step, dataclasses.asdict(state), ema, config.checkpoints_total_limit)
        saved_step = state.step
    logger = RunLogger(accelerator, config.log_with, out, run_name="ldm-train-vae")
    grid_batch = None  # the fixed images of every grid, read on the main process at the first grid

    def ema_weights():
        return ema.swapped_in(autoencoder) if ema is not None else contextlib.nullcontext()

    def evaluate(step: int, with_metrics: bool) -> dict[str, float]:
        """Grid of originals over reconstructions, and validation metrics (main process; the others wait)."""
        nonlocal grid_batch
        metrics = {}
        if accelerator.is_main_process:
            if grid_batch is None:
                grid_batch = first_images(config)
            trainee.eval()
            with ema_weights():
                with accelerator.autocast():
                    recs = reconstruct(autoencoder, grid_batch.to(device))
                n = grid_batch.shape[0]
                images = to_pil(torch.cat([grid_batch.float().cpu(), recs.float().cpu()]), check=False)
                logger.grid("reconstructions", make_grid(images, ncols=n), step)
                if with_metrics and config.validation.shards:
                    metrics = validate(autoencoder, config, device, accelerator.autocast)
                    logger.scalars(metrics, step)
                    accelerator.print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            trainee.train()
        accelerator.wait_for_everyone()
        return metrics

    progress = None
    if config.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=state.step, desc="train-vae", unit="step")
    timer, timer_step = time.perf_counter(), state.step
    run_start = time.perf_counter()
    trainee_w.train()
    while state.step < config.max_steps:
        step = state.step
        batch = next(batches)
        data_counts.add(batch)
        x = batch["image"].to(device, non_blocking=True)
        set_lr(opt_ae, lr_at(step, config.optim, config.max_steps))
        set_lr(opt_d, lr_at(step, config.disc_optim, config.max_steps))

        # 1. The autoencoder: NLL + KL (+ adaptive-weight GAN once the discriminator is on).
        noise = torch.Generator(device).manual_seed(derive_seed(config.seed, "posterior", rank, step))
        with accelerator.autocast():
            rec, posterior, logvar = trainee_w(x, generator=noise)
            loss, logs = objective.generator_loss(x, rec, posterior, logvar, step, last_layer=last_layer)
        accelerator.backward(loss)
        if config.optim.max_grad_norm is not None:
            logs["grad_norm"] = accelerator.clip_grad_norm_(trainee.parameters(), config.optim.max_grad_norm)
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(autoencoder)

        # 2. The discriminator, on the same batch against the detached reconstruction (not before disc_start).
        if objective.disc_active(step):
            with accelerator.autocast():
                d_loss, d_logs = objective.discriminator_loss(x, rec.detach(), step, discriminator=disc_w)
            accelerator.backward(d_loss)
            if config.disc_optim.max_grad_norm is not None:
                accelerator.clip_grad_norm_(objective.discriminator.parameters(), config.disc_optim.max_grad_norm)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            logs.update(d_logs)
        state.step = step = step + 1
        if progress is not None:
            progress.update(1)

        if step % config.log_every == 0 or step == config.max_steps:
            data_counts.sync(accelerator, state)
            values = {k: float(v) for k, v in logs.items()}
            values.update(state.data_counts(), lr=opt_ae.param_groups[0]["lr"], epoch=state.epoch,
                          img_per_s=(step - timer_step) * x.shape[0] * world / (time.perf_counter() - timer))
            if not math.isfinite(values["loss"]):
                raise LdmError(f"the autoencoder loss became {values['loss']} at step {step}; lower optim.lr, or use "
                               "mixed_precision=bf16 instead of fp16")
            logger.scalars(values, step)
            if progress is not None:
                progress.set_postfix(rec=f"{values['rec_loss']:.4f}", kl=f"{values['kl_loss']:.0f}",
                                     img_s=f"{values['img_per_s']:.0f}")
            else:  # no bar (progress=false, batch jobs): one line per log step
                accelerator.print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))
            timer, timer_step = time.perf_counter(), step
        if config.grid_every and step % config.grid_every == 0 and step != config.max_steps:
            evaluate(step, with_metrics=False)
        if config.validation.every and step % config.validation.every == 0 and step != config.max_steps:
            evaluate(step, with_metrics=True)
        if step % config.checkpoint_every == 0:
            checkpoint_now()

    # The end: checkpoint (so --max-steps can grow with --resume latest), grid + metrics, scale factor, export.
    if progress is not None:
        progress.close()
    if saved_step != state.step:
        checkpoint_now()
    metrics = evaluate(state.step, with_metrics=True)
    if accelerator.is_main_process:
        with ema_weights():
            scale = measure_scale_factor(autoencoder, config, device, accelerator.autocast)
            with export_failures(out):
                export_autoencoder(autoencoder, scale, out)
        summary = {"step": state.step, "scale_factor": scale, "seconds": time.perf_counter() - run_start,
                   **metrics, **state.data_counts(), "perceptual_weight": config.loss.perceptual_weight,
                   **({"notes": notes} if notes else {})}
        logger.scalars({"scale_factor": scale}, state.step)
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
    accelerator.wait_for_everyone()
    logger.close()
    return out


@torch.no_grad()
def measure_scale_factor(autoencoder: AutoencoderKL, config: VAETrainConfig, device: torch.device, autocast) -> float:
    """1 / std of posterior samples of `scale_batches` training batches (their own seeded stream, not the run's)."""
    loader = make_loader(dataclasses.replace(config.data, batches_per_epoch=config.scale_batches), 0, 1)
    loader.set_epoch(0)
    generator = torch.Generator(device).manual_seed(config.seed)

    def latents():
        for batch in islice(loader, config.scale_batches):
            with autocast():
                posterior = autoencoder.encode(batch["image"].to(device))
            yield posterior.sample(generator).float() - autoencoder.config.shift_factor

    return estimate_scale_factor(latents())
