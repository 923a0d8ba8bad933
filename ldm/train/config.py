"""TrainConfig: one dataclass per section of a training YAML (model, data, loss, optim, ema, sampling, run)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm.data.config import DataConfig
from ldm.diffusion.sampler_registry import get_sampler
from ldm.errors import ConfigError
from ldm.models.attention import BACKENDS

LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "bf16", "fp16")
LOGGERS = ("tensorboard", "wandb", "none")
INPUTS = ("images", "latents")
SIGMA_SAMPLERS = ("discrete", "lognormal")
WEIGHTINGS = ("auto", "eps", "v", "x0", "edm", "min_snr")


@dataclass
class PretrainedConfig:
    """Weights to start from: anything `ldm.io.formats.load_model` reads, or a `.safetensors` of native keys."""

    autoencoder: str | None = None  # required for real runs: the autoencoder is frozen, never trained here
    text_encoder: str | None = None  # CLIP / OpenCLIP weights (frozen); None = the encoder's own `pretrained` setting
    unet: str | None = None  # fine-tune from these U-Net weights; None = random init (training from scratch)


@dataclass
class ModelConfig:
    """The latent diffusion model; each section is the component's own config dataclass, as a mapping."""

    unet: dict = field(default_factory=dict)  # ldm.models.unet.UNetConfig (use_checkpoint = gradient checkpointing),
    # or another registered network with `type` (Imagen: type: efficient_unet)
    autoencoder: dict | None = field(default_factory=dict)  # ldm.models.autoencoder.AutoencoderConfig (with
    # scale_factor); null: a pixel-space model with no autoencoder
    text_encoder: dict = field(default_factory=dict)  # ldm.models.text_encoders.TextEncoderConfig (its `freeze`
    # decides whether it trains with the U-Net: by default only the small encoder does)
    schedule: dict = field(default_factory=dict)  # ldm.diffusion.schedules.ScheduleConfig (diffusers keys)
    stage: dict | None = None  # a pixel cascade stage: ldm.diffusion.noise_augmentation.StageConfig (an SR stage
    # names low_res_size and trains on low-res images made from its own samples); on a latent model only its own
    # sampling defaults: {steps, guidance, sampler} (configs/emoji.yaml)
    latent_upscale: dict | None = None  # a latent upscaler (the SD x4 upscaler): ldm.diffusion.latent_upscale.
    # LatentUpscaleConfig; trains on low-res images made from its own samples, noised at random levels
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    random_autoencoder: bool = False  # allow a frozen random autoencoder (tests only: its latents mean nothing)


@dataclass
class LossConfig:
    """What the network learns: which noise levels, how they are weighted, and from which inputs."""

    sigma_sampler: str = "discrete"  # "discrete": uniform over the schedule's timesteps (DDPM); "lognormal" (EDM)
    p_mean: float = -1.2  # lognormal: mean of log(sigma) (Karras et al. 2022, table 1)
    p_std: float = 1.2  # lognormal: std of log(sigma)
    weighting: str = "auto"  # "auto" (the prediction type's own MSE: eps / v / x0), "min_snr", "edm", "eps", "v", "x0"
    min_snr_gamma: float = 5.0  # min-SNR-gamma weighting (Hang et al. 2023)
    sigma_data: float = 0.5  # "edm" weighting
    vlb_weight: float = 0.001  # learn_sigma U-Nets: L_simple + vlb_weight * L_vlb (Nichol & Dhariwal 2021)
    offset_noise: float = 0.0  # per-channel constant added to the noise (Guttenberg 2023); 0 = off
    inputs: str = "images"  # "images": encode pixels with the frozen autoencoder; "latents": precomputed latent shards

    def __post_init__(self):
        if self.inputs not in INPUTS:
            raise ConfigError(f"loss.inputs must be one of {list(INPUTS)}, got {self.inputs!r}")
        if self.sigma_sampler not in SIGMA_SAMPLERS:
            raise ConfigError(f"loss.sigma_sampler must be one of {list(SIGMA_SAMPLERS)}, got {self.sigma_sampler!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"loss.weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        for name in ("p_std", "min_snr_gamma", "sigma_data"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"loss.{name} must be > 0, got {getattr(self, name)}")
        if self.vlb_weight < 0:
            raise ConfigError(f"loss.vlb_weight must be >= 0, got {self.vlb_weight}")


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with linear warm-up and a decay schedule."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    fused: bool | None = None  # fused AdamW kernel; None = on CUDA only
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None = no clipping
    lr_schedule: str = "constant"  # "constant" | "cosine" | "linear" (after the warm-up)
    warmup_steps: int = 0  # optimizer steps of linear warm-up from lr / warmup_steps to lr
    decay_steps: int | None = None  # steps over which cosine/linear decay; None = max_steps
    min_lr_ratio: float = 0.0  # final lr / lr for cosine and linear

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"optim.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or not self.lr > 0:
            raise ConfigError("optim.lr must be > 0 and optim.warmup_steps >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {list(self.betas)}")
        if self.eps < 0 or self.weight_decay < 0:
            raise ConfigError(f"optim.eps and optim.weight_decay must be >= 0, got {self.eps} and {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:  # <= 0 zeroes or flips every gradient
            raise ConfigError(f"optim.max_grad_norm must be > 0 (e.g. 1.0), or null for no clipping; got "
                              f"{self.max_grad_norm}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ConfigError(f"optim.decay_steps ({self.decay_steps}) must exceed optim.warmup_steps "
                              f"({self.warmup_steps}), or be null to decay until max_steps")


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights; the exported model uses it."""

    enabled: bool = True
    decay: float = 0.9999  # the (maximum) decay per optimizer step
    warmup: bool = False  # decay_n = min(decay, 1 - (1 + n / inv_gamma) ** -power) for the n-th update
    inv_gamma: float = 1.0
    power: float = 2 / 3  # 2/3 suits ~1M steps, 3/4 ~100k steps (k-diffusion's EMAWarmup)

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay must lie in [0, 1), got {self.decay}")
        if not (self.inv_gamma > 0 and self.power > 0):
            raise ConfigError(f"ema.inv_gamma and ema.power must be > 0, got {self.inv_gamma} and {self.power}")


@dataclass
class SamplingConfig:
    """Sample grids drawn with the EMA weights during training (PNG into DIR/samples/ and the logs)."""

    every: int = 0  # optimizer steps between grids; 0 = only at the end of the run
    at_end: bool = True
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    n_per_prompt: int = 2
    sampler: str = "euler"  # a name in ldm.diffusion.sampler_registry
    steps: int = 20
    guidance: float = 5.0  # classifier-free guidance scale (<= 1 disables it)
    seed: int = 0
    # Evaluation at every grid (issue: "evaluation inside training"): CLIP score of the generated prompt set, and a
    # Frechet distance when reference statistics are given (FID for Inception .npz stats, FD_CLIP for CLIP stats).
    eval_prompts: str | None = None  # a prompt-set name (ldm_eval_v1) or file; None = no evaluation
    eval_max_prompts: int = 64  # the first N prompts of the set
    clip_model: str = "ViT-B-32"  # open_clip architecture name or config .json
    clip_pretrained: str | None = None  # tag, local weights file, or "none" (random: for tests only)
    ref_stats: str | None = None  # .npz with mu/sigma (ldm-fid --save-stats)
    inception_weights: str | None = None  # for FID against Inception statistics

    def __post_init__(self):
        # Checked at the start: the grids are drawn after training steps (at the latest at the end of the run, before
        # the export), so a typo here would otherwise fail only then.
        get_sampler(self.sampler)  # an unknown name lists the samplers
        if self.every < 0 or self.steps < 1 or self.n_per_prompt < 1 or self.eval_max_prompts < 1:
            raise ConfigError(f"sampling.every must be >= 0 (0: only at the end), sampling.steps, n_per_prompt and "
                              f"eval_max_prompts >= 1; got {self.every}, {self.steps}, {self.n_per_prompt} and "
                              f"{self.eval_max_prompts}")
        if not 0.0 <= self.guidance < float("inf"):
            raise ConfigError(f"sampling.guidance must be a finite number >= 0 (<= 1: no guidance), got "
                              f"{self.guidance}")


@dataclass
class TrainConfig:
    """Everything a training run needs; `tools/train.py --config X.yaml key=value ...` builds it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps (each of grad_accum micro-batches per rank)
    grad_accum: int = 1  # micro-batches of data.batch_size per optimizer step and rank
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (autocast; weights and optimizer stay float32)
    seed: int = 0  # model init, and with the rank the per-sample noise seeds
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (the end of a run always writes one)
    checkpoints_total_limit: int | None = 3  # keep the newest N checkpoints; None = keep all
    log_every: int = 10  # optimizer steps between logged scalars
    log_with: str = "tensorboard"  # "tensorboard" | "wandb" | "none"
    attention_backend: str = "sdpa"  # "sdpa" | "xformers" (falls back to sdpa with a warning) | "math"
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    compile: bool | None = None  # torch.compile (inductor) the U-Net's training step; None = on CUDA, off on CPUs
    fp8: bool = False  # the U-Net's transformer linears multiply in FP8 (ldm.models.float8; Ada/Hopper GPUs)
    progress: bool = True  # tqdm bar on the main process

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.log_with not in LOGGERS:
            raise ConfigError(f"log_with must be one of {list(LOGGERS)}, got {self.log_with!r}")
        if self.max_steps < 0 or self.grad_accum < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("max_steps must be >= 0, grad_accum, checkpoint_every and log_every >= 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("checkpoints_total_limit must be >= 1 or null")
        if self.attention_backend not in BACKENDS:
            raise ConfigError(f"attention_backend must be one of {list(BACKENDS)}, got {self.attention_backend!r}")
