"""Training a small CLIP (Radford et al. 2021) from scratch on captioned shards: an open_clip model definition, the
symmetric contrastive loss, and the run machinery of the other loops (resume, EMA, trackers, atomic export).

The export is `DIR/<name>.json` (the open_clip model config) and `DIR/<name>.safetensors` (its state dict):
`open_clip.add_model_config("DIR/<name>.json"); open_clip.create_model("<name>", pretrained="DIR/<name>.safetensors")`
loads it, and `ldm-eval --clip-model DIR/<name>.json --clip-pretrained DIR/<name>.safetensors` scores with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.atomic import atomic_write_text
from ldm.config import save_yaml, to_plain
from ldm.data.config import DataConfig
from ldm.data.loader import make_loader
from ldm.errors import ConfigError, LdmError
from ldm.eval.retrieval import retrieval_accuracy
from ldm.io.checkpoint import write_safetensors
from ldm.train.batches import batch_stream, stream_settings
from ldm.train.checkpointing import export_failures, resolve_resume, save_checkpoint, start_state
from ldm.train.config import EMAConfig, OptimConfig
from ldm.train.ema import EMA
from ldm.train.optim import lr_at, make_optimizer, set_lr
from ldm.train.run_folder import open_run
from ldm.train.tracking import RunLogger

MIXED_PRECISION = ("no", "bf16", "fp16")
# open_clip's default normalisation (OpenAI's dataset statistics): what its preprocess applies at evaluation too.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)  # temperature clamp of the CLIP paper


@dataclass
class ClipValidationConfig:
    """Held-out pairs: zero-shot retrieval top-1/top-5, text->image and image->text."""

    shards: str | list[str] = ""  # "" = no held-out metrics
    max_images: int = 4096
    batch_size: int = 256
    every: int = 0  # optimizer steps between validations; 0 = at the end only


@dataclass
class ClipTrainConfig:
    """Everything `tools/train_clip.py --config X.yaml key=value ...` needs."""

    name: str = "clip-emoji"  # the open_clip model name the export registers (file stem of DIR/<name>.json)
    model: dict = field(default_factory=dict)  # open_clip model config: embed_dim, vision_cfg, text_cfg[, quick_gelu]
    data: DataConfig = field(default_factory=DataConfig)
    validation: ClipValidationConfig = field(default_factory=ClipValidationConfig)
    # AdamW with beta2 0.98 and weight decay 0.2, as CLIP / open_clip train from scratch
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                                                   weight_decay=0.2, lr_schedule="cosine"))
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    output_dir: str = "runs/clip"
    max_steps: int = 1000
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 2
    log_every: int = 50
    log_with: str = "tensorboard"  # "tensorboard" | "wandb" | "none"
    allow_tf32: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.max_steps < 0 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("max_steps must be >= 0; checkpoint_every and log_every >= 1")
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(self.model)
        if missing:
            raise ConfigError(f"model (the open_clip model config) lacks {sorted(missing)}")
        size = self.model["vision_cfg"].get("image_size", 224)
        if size != self.data.resolution:
            raise ConfigError(f"model.vision_cfg.image_size={size} must equal data.resolution={self.data.resolution}")
        if self.data.caption_dropout:
            raise ConfigError("data.caption_dropout must be 0 for CLIP: an empty caption is no positive pair")


def register_model(name: str, model_cfg: dict, folder: Path) -> Path:
    """Write `folder/<name>.json` atomically and register it with open_clip; returns the file."""
    import open_clip

    path = Path(folder) / f"{name}.json"
    atomic_write_text(path, json.dumps(model_cfg, indent=2))
    open_clip.add_model_config(path)
    return path


def build_clip(name: str, model_cfg: dict, folder: Path) -> nn.Module:
    """A randomly initialised open_clip CLIP of `model_cfg`, created through open_clip's own factory."""
    import open_clip

    register_model(name, model_cfg, folder)
    return open_clip.create_model(name, pretrained=None)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """Loader images in [-1, 1] -> open_clip's input (0..1, then the mean/std its preprocess uses)."""
    mean = torch.tensor(IMAGE_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=x.device, dtype=x.dtype)[:, None, None]
    return ((x + 1) / 2 - mean) / std


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: row i of each is a positive pair, every other row a negative."""
    logits = logit_scale * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def gather_with_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    """All ranks' features, this rank's with its gradient (each rank then sees the global batch's negatives)."""
    if world == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


class ClipTrainee(nn.Module):
    """What DDP wraps: the CLIP and its tokenizer; forward(images, captions) -> (image, text features, scale)."""

    def __init__(self, clip: nn.Module, tokenizer):
        super().__init__()
        self.clip, self.tokenizer = clip, tokenizer

    def forward(self, images: torch.Tensor, captions: list[str]):
        ids = self.tokenizer(captions).to(images.device)
        return self.clip.encode_image(normalize_images(images)), self.clip.encode_text(ids), self.clip.logit_scale.exp()


@torch.no_grad()
def embed_pairs(trainee: ClipTrainee, config: ClipTrainConfig, device: torch.device, autocast):
    """Image and text embeddings `n d` (float32, CPU) of the held-out pairs, one pass in shard order, and their
    captions (retrieval counts pairs with the same caption as right answers for each other)."""
    v = config.validation
    data = dataclasses.replace(config.data, shards=v.shards, batch_size=v.batch_size, resampled=False,
                               crop="center", flip_prob=0.0, shuffle_buffer=0, caption_dropout=0.0, buckets=None)
    imgs, txts, captions, seen = [], [], [], 0
    for batch in make_loader(data, rank=0, world_size=1):
        n = min(len(batch["caption"]), v.max_images - seen)
        with autocast():
            img, txt, _ = trainee(batch["image"][:n].to(device), batch["caption"][:n])
        imgs.append(img.float().cpu())
        txts.append(txt.float().cpu())
        captions += batch["caption"][:n]
        seen += n
        if seen >= v.max_images:
            break
    if not imgs:
        raise LdmError(f"validation.shards={v.shards!r} yielded no images")
    return torch.cat(imgs), torch.cat(txts), captions


def export_clip(clip: nn.Module, name: str, model_cfg: dict, out: Path) -> tuple[Path, Path]:
    """`out/<name>.safetensors` (open_clip keys, float32) and `out/<name>.json`, each written atomically."""
    weights = Path(out) / f"{name}.safetensors"
    write_safetensors(clip.state_dict(), weights, metadata={"format": "pt", "open_clip_model": name})
    return register_model(name, model_cfg, out), weights


def train_clip(config: ClipTrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the CLIP of `config` into `config.output_dir`; returns the folder holding the export.

    A fresh run needs an empty folder; `resume` continues the run there and `overwrite` deletes it first.
    """
    import open_clip
    out = Path(config.output_dir)
    held_out = [config.validation.shards] if config.validation.shards else []  # found up front too, not at the end
    accelerator = open_run(out, resume, overwrite, mixed_precision=config.mixed_precision, log_with=config.log_with,
                           shards=[config.data.shards, *held_out])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    checkpoint = resolve_resume(out, resume)  # before build_clip writes the model's record into the folder
    torch.manual_seed(config.seed)  # the same init on every rank
    clip = build_clip(config.name, config.model, out)
    trainee = ClipTrainee(clip, open_clip.get_tokenizer(config.name))
    ema = None
    if config.ema.enabled:
        e = config.ema
        ema = EMA(clip, e.decay, warmup=e.warmup, inv_gamma=e.inv_gamma, power=e.power).to(device)
    optimizer = make_optimizer(trainee.parameters(), config.optim, device)
    trainee_w, optimizer = accelerator.prepare(trainee, optimizer)

    loader = make_loader(config.data, rank=rank, world_size=world)  # per-rank stream already
    state = start_state(accelerator, checkpoint, ema, out, config.max_steps,
                        stream_settings(config.data, loader.urls, world))
    if accelerator.is_main_process:  # once the checkpoint is restored: a refused --resume leaves the run's record alone
        save_yaml(to_plain(config), out / "config.yaml")
    saved_step = state.step if checkpoint is not None else None
    batches = batch_stream(loader, state)
    logger = RunLogger(accelerator, config.log_with, out, run_name="ldm-train-clip")

    def ema_weights():
        return ema.swapped_in(clip) if ema is not None else contextlib.nullcontext()

    def evaluate(step: int) -> dict[str, float]:
        """Held-out retrieval on the main process (EMA weights when kept); the others wait."""
        metrics = {}
        if accelerator.is_main_process and config.validation.shards:
            trainee.eval()
            with ema_weights():
                img, txt, captions = embed_pairs(trainee, config, device, accelerator.autocast)
            trainee.train()
            metrics = {f"val/{k}": v for k, v in retrieval_accuracy(img, txt, captions=captions).items()}
            metrics["val/pairs"] = float(len(img))
            logger.scalars(metrics, step)
            accelerator.print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        accelerator.wait_for_everyone()
        return metrics

    progress = None
    if config.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.max_steps, initial=state.step, desc="train-clip", unit="step")
    timer, timer_step, run_start = time.perf_counter(), state.step, time.perf_counter()
    trainee_w.train()
    while state.step < config.max_steps:
        step = state.step
        batch = next(batches)
        x = batch["image"].to(device, non_blocking=True)
        set_lr(optimizer, lr_at(step, config.optim, config.max_steps))
        with accelerator.autocast():
            img, txt, scale = trainee_w(x, batch["caption"])
            loss = contrastive_loss(gather_with_grad(img, world), gather_with_grad(txt, world), scale)
        accelerator.backward(loss)
        logs = {"loss": loss.detach()}
        if config.optim.max_grad_norm is not None:
            logs["grad_norm"] = accelerator.clip_grad_norm_(trainee.parameters(), config.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if ema is not None:
            ema.update(clip)
        state.step = step = step + 1
        if progress is not None:
            progress.update(1)
        if step % config.log_every == 0 or step == config.max_steps:
            values = {k: float(v) for k, v in logs.items()}
            values.update(lr=optimizer.param_groups[0]["lr"], logit_scale=float(scale.detach()), epoch=state.epoch,
                          img_per_s=(step - timer_step) * x.shape[0] * world / (time.perf_counter() - timer))
            if not math.isfinite(values["loss"]):
                raise LdmError(f"the contrastive loss became {values['loss']} at step {step}; lower optim.lr")
            logger.scalars(values, step)
            if progress is not None:
                progress.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{values['img_per_s']:.0f}")
            else:
                accelerator.print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))
            timer, timer_step = time.perf_counter(), step
        if config.validation.every and step % config.validation.every == 0 and step != config.max_steps:
            evaluate(step)
        if step % config.checkpoint_every == 0:
            save_checkpoint(accelerator, out, step, dataclasses.asdict(state), ema, config.checkpoints_total_limit)
            saved_step = step

    if progress is not None:
        progress.close()
    if saved_step != state.step:
        save_checkpoint(accelerator, out, state.step, dataclasses.asdict(state), ema, config.checkpoints_total_limit)
    metrics = evaluate(state.step)
    if accelerator.is_main_process:
        with ema_weights():
            with export_failures(out):
                export_clip(clip, config.name, config.model, out)
        summary = {"step": state.step, "seconds": time.perf_counter() - run_start, **metrics}
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
    accelerator.wait_for_everyone()
    logger.close()
    return out


def load_clip(config_json: str | Path, weights: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """An exported CLIP back through open_clip: register its config, create the model, load the state dict."""
    import open_clip

    config_json = Path(config_json)
    if not config_json.is_file() or not Path(weights).is_file():
        raise LdmError(f"CLIP export incomplete: need {config_json} and {weights}")
    open_clip.add_model_config(config_json)
    return open_clip.create_model(config_json.stem, pretrained=str(weights), device=device).eval()
