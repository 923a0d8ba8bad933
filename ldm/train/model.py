"""The model a training run builds: a trainable U-Net denoiser, a frozen autoencoder, a text encoder."""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.config import from_dict, to_plain
from ldm.diffusion.denoiser import build_denoiser
from ldm.diffusion.losses import DiscreteSigmaSampler, LogNormalSigmaSampler, denoising_loss, get_weighting, hybrid_loss
from ldm.diffusion.schedules import FIXED_VARIANCE_TYPES, ScheduleConfig, short_prediction
from ldm.errors import ConfigError, LdmError
from ldm.diffusion.conditioning import ConcatNetwork, takes_pooled_text
from ldm.diffusion.conditioning import text_conditioning as _text_conditioning
from ldm.diffusion.latent_upscale import SECTION as LATENT_UPSCALE_SECTION
from ldm.diffusion.latent_upscale import LatentUpscaleConfig
from ldm.diffusion.noise_augmentation import SAMPLING_DEFAULTS, StageConfig
from ldm.io.checkpoint import load_into, read_state_dict
from ldm.io.components import ModelParts, codec_for, config_sections
from ldm.io.formats import load_model
from ldm.io.infer import normalize_text_keys, strip_prefix
from ldm.io.part_types import PART_TYPES, build_part, read_section, section_dict, section_type
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder, hf_config_fields
from ldm.models.unet import UNetConfig, UNetModel
from ldm.train.config import LossConfig, ModelConfig

PREFIXES = {"unet": "model.diffusion_model.", "autoencoder": "first_stage_model.", "text_encoder": "cond_stage_model."}


@dataclass
class LatentDiffusionParts:
    """The built networks and their resolved configs (the dataclasses, defaults filled in)."""

    unet: UNetModel
    autoencoder: AutoencoderKL | None  # None: a pixel-space model (the U-Net denoises the image itself)
    text_encoder: nn.Module
    schedule: ScheduleConfig
    text_encoder_config: Any  # ldm.models.text_encoders.TextEncoderConfig
    stage: StageConfig | None = None  # a pixel cascade stage (sizes, augmentation, thresholding); a latent
    # model's holds only its own sampling defaults (SAMPLING_DEFAULTS)
    latent_upscale: LatentUpscaleConfig | None = None  # a latent upscaler (the SD x4 upscaler)

    @property
    def super_resolution(self) -> bool:
        """Whether the network upscales a low-res image concatenated to its input (an SR stage)."""
        return self.stage is not None and self.stage.low_res_size is not None

    @property
    def upscales(self) -> bool:
        """A pixel SR stage or a latent upscaler: the low-res input is made from each training sample itself."""
        return self.super_resolution or self.latent_upscale is not None

    @property
    def codec(self) -> nn.Module:
        """Images <-> the space the U-Net denoises: the frozen autoencoder's latents, or the pixels themselves."""
        return codec_for({"autoencoder": self.autoencoder} if self.autoencoder is not None else {})

    @property
    def train_text_encoder(self) -> bool:
        """Whether the text encoder trains with the U-Net (TextEncoderConfig.freeze; by default the small one does)."""
        return not getattr(self.text_encoder, "frozen", True)

    def model_parts(self, source: str = "") -> ModelParts:
        """The networks as a model (what the native format saves and the pipeline samples)."""
        configs = {"unet": self.unet.config, "autoencoder": getattr(self.autoencoder, "config", None),
                   "text_encoder": self.text_encoder_config}
        config = config_sections(configs, self.schedule)
        if self.stage is not None:
            stage = to_plain(self.stage)
            if self.autoencoder is not None:  # a latent model's stage section holds only its sampling defaults
                stage = {k: stage[k] for k in SAMPLING_DEFAULTS if stage[k] is not None}
            config["stage"] = stage
        if self.latent_upscale is not None:
            config[LATENT_UPSCALE_SECTION] = to_plain(self.latent_upscale)
        return ModelParts(unet=self.unet, autoencoder=self.autoencoder, text_encoder=self.text_encoder,
                          schedule=self.schedule, config=config, source=source)

    def resolved(self) -> dict:
        """The model section with every default written out, as saved in DIR/train_config.yaml."""
        # section_dict writes a network's `type` (efficient_unet, if_unet), so that the file trains again as --config
        autoencoder = getattr(self.autoencoder, "config", None)
        return {"unet": section_dict("unet", self.unet.config),
                "autoencoder": None if autoencoder is None else section_dict("autoencoder", autoencoder),
                "text_encoder": to_plain(self.text_encoder_config), "schedule": to_plain(self.schedule),
                "stage": to_plain(self.stage), "latent_upscale": to_plain(self.latent_upscale)}


_TRUNCATION = " tokens; the dropped words are: "  # the text encoders' warning of a prompt cut at their context
_TRUNCATION_SAID: "weakref.WeakSet" = weakref.WeakSet()  # encoders whose training captions were said to be cut
# the other warnings `encode_captions` passed on, by place and text: each is passed on once, as the default filter
# shows it, not at every step (the catch_warnings around each call resets every warnings registry)
_RELAYED: set = set()


def encode_captions(text_encoder: nn.Module, captions: list[str]):
    """`text_encoder.encode(captions)` for training: captions longer than the encoder's context are cut, as in
    Stable Diffusion's training. The encoder warns for every such prompt (right for a user's prompt); web captions
    are often that long, which would print a warning for most samples of every step, so it is said once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embeddings = text_encoder.encode(captions)
    for w in caught:
        if _TRUNCATION not in str(w.message):
            place = (w.category, str(w.message), w.filename, w.lineno)
            if place not in _RELAYED:
                _RELAYED.add(place)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif text_encoder not in _TRUNCATION_SAID:
            _TRUNCATION_SAID.add(text_encoder)
            warnings.warn(f"{w.message} (captions longer than the text encoder's context are cut, as in Stable "
                          "Diffusion's training; this is said once per run)", stacklevel=2)
    return embeddings


def _load_weights(kind: str, module: nn.Module, path: str) -> nn.Module:
    """Weights for one component from a file: its native keys, or a whole original SD checkpoint (its part taken).

    Of an original checkpoint with both, the trained (non-EMA) U-Net weights are taken, the usual start of a fine-tune.
    """

    sd = read_state_dict(path)
    prefix = PREFIXES[kind]
    if any(k.startswith(prefix) for k in sd):
        sd = strip_prefix(normalize_text_keys(sd) if kind == "text_encoder" else sd, prefix)
    if kind == "text_encoder":  # a buffer transformers 5 no longer has, and OpenCLIP's unused image tower
        sd.pop("transformer.text_model.embeddings.position_ids", None)
        sd = {k: v for k, v in sd.items() if not k.startswith("model.visual.")}
    return load_into(module, sd, source=f"model.pretrained.{kind}={path}")


def _pretrained(kind: str, module: nn.Module, path: str | None) -> tuple[nn.Module, dict | None]:
    """The component with `path`'s weights, and the model config when `path` was a whole model (its config wins)."""
    if path is None:
        return module, None
    if Path(path).is_file():
        return _load_weights(kind, module, path), None

    components = load_model(path)
    return getattr(components, kind), components.config


def unet_config_of(config: ModelConfig):
    """The config object of `model.unet` (its registered type's dataclass)."""
    kind = section_type("unet", config.unet)  # `type: efficient_unet` for Imagen's stages; SD's U-Net otherwise
    return from_dict(PART_TYPES[kind].config_class, {k: v for k, v in config.unet.items() if k != "type"},
                     where="model.unet")


def build_unet(config: ModelConfig) -> nn.Module:
    """The denoising network `model.unet` describes, randomly initialised (no weights loaded)."""
    return build_part(unet_config_of(config))


def build_parts(config: ModelConfig) -> LatentDiffusionParts:
    """Build (and load) the networks a ModelConfig describes, in float32; the autoencoder is always frozen.

    `model.autoencoder: null` makes a pixel-space model: no autoencoder, the U-Net denoises the images.
    """
    unet_config = unet_config_of(config)
    unet = build_part(unet_config)
    stage = from_dict(StageConfig, config.stage, where="model.stage") if config.stage is not None else None
    upscale = (from_dict(LatentUpscaleConfig, config.latent_upscale, where="model.latent_upscale")
               if config.latent_upscale is not None else None)
    pixel = config.autoencoder is None
    autoencoder = None if pixel else AutoencoderKL(from_dict(AutoencoderConfig, config.autoencoder,
                                                             where="model.autoencoder"))
    if config.text_encoder.get("type") == "sdxl":  # SDXL's CLIP ViT-L + OpenCLIP bigG (weights: pretrained.*)
        text_config = read_section("text_encoder", config.text_encoder)
        text_encoder = build_part(text_config)
    else:
        text_config = from_dict(TextEncoderConfig, config.text_encoder, where="model.text_encoder")
        text_encoder = build_text_encoder(text_config)
        if text_config.type == "t5" and text_config.hf_config is None:  # a `pretrained` T5: the export must name its size
            text_config.hf_config = hf_config_fields(text_encoder.model.config.to_dict())
    schedule = from_dict(ScheduleConfig, config.schedule, where="model.schedule")

    if not pixel and config.pretrained.autoencoder is None and not config.random_autoencoder:
        raise ConfigError("model.pretrained.autoencoder is required: the autoencoder is frozen, so it must be a "
                          "trained one (an SD checkpoint, a native/diffusers model folder, or a .safetensors of its "
                          "weights); model.random_autoencoder=true allows a random one for tests")
    unet, _ = _pretrained("unet", unet, config.pretrained.unet)
    if not pixel:
        autoencoder, _ = _pretrained("autoencoder", autoencoder, config.pretrained.autoencoder)
    text_encoder, whole = _pretrained("text_encoder", text_encoder, config.pretrained.text_encoder)
    if whole is not None:
        text_config = read_section("text_encoder", whole["text_encoder"])  # any registered type (SDXL's too)
    for module in (m for m in (unet, autoencoder, text_encoder) if m is not None):
        module.float()  # stored fp16 weights would break float32 training; autocast picks the compute dtype
    unet.requires_grad_(True).train()
    unet.set_gradient_checkpointing(unet_config.use_checkpoint)  # also for a U-Net loaded from a model folder

    if autoencoder is not None:
        autoencoder.requires_grad_(False).eval()
    context_dim = getattr(text_encoder, "dim", None)
    if unet.config.context_dim is not None and context_dim is not None and context_dim != unet.config.context_dim:
        raise ConfigError(f"model.unet.context_dim={unet.config.context_dim} but the text encoder gives "
                          f"{context_dim}-wide embeddings; make them equal")
    channels = codec_for({"autoencoder": autoencoder} if autoencoder is not None else {}).latent_channels
    if unet.config.in_channels < channels:
        raise ConfigError(f"model.unet.in_channels={unet.config.in_channels} is fewer than the {channels} channels "
                          f"it denoises ({'latent' if autoencoder is not None else 'RGB'})")
    if stage is not None and not pixel and set(config.stage) - set(SAMPLING_DEFAULTS):
        raise ConfigError(f"model.stage sets {sorted(set(config.stage) - set(SAMPLING_DEFAULTS))}, which describe a "
                          "pixel cascade stage: set model.autoencoder=null, or keep only the sampling defaults "
                          f"{list(SAMPLING_DEFAULTS)} in a latent model's model.stage")
    if stage is not None and (stage.low_res_size is not None) != (unet.config.in_channels == 2 * channels):
        raise ConfigError(f"model.unet.in_channels={unet.config.in_channels}: a super-resolution stage (model.stage."
                          f"low_res_size) takes {2 * channels} channels (the noisy image and the low-res image), a "
                          f"base stage {channels}")
    if upscale is not None:
        check_latent_upscaler(unet.config, upscale, channels, pixel)
    return LatentDiffusionParts(unet, autoencoder, text_encoder, schedule, text_config, stage, upscale)


def check_latent_upscaler(unet_config, upscale: LatentUpscaleConfig, channels: int, pixel: bool) -> None:
    """A latent upscaler needs an autoencoder, the 3 low-res channels beside the latent, and a label per level."""
    if pixel:
        raise ConfigError("model.latent_upscale describes a latent upscaler: it needs model.autoencoder (its factor "
                          "is the upscale factor)")
    if unet_config.in_channels != channels + 3:
        raise ConfigError(f"model.unet.in_channels={unet_config.in_channels}: a latent upscaler takes {channels + 3} "
                          f"({channels} latent + 3 low-res RGB channels)")
    classes = getattr(unet_config, "num_classes", None)
    if classes is None or classes < upscale.max_noise_level:
        raise ConfigError(f"model.unet.num_classes={classes}: a latent upscaler's noise level is its class label, so "
                          f"num_classes must be at least model.latent_upscale.max_noise_level={upscale.max_noise_level}")


def text_conditioning(embeddings, unet_config: UNetConfig) -> dict[str, torch.Tensor]:
    """TextEmbeddings -> the U-Net's keyword arguments (context and its mask, pooled `y` for ADM-style U-Nets)."""
    return _text_conditioning(embeddings, pooled=takes_pooled_text(unet_config))




def make_weighting(loss: LossConfig, schedule: ScheduleConfig):
    """The loss weighting of sigma; "auto" is the MSE of what the network predicts (eps, v or x0), EDM's for edm.

    EDM's lambda(sigma) uses the model's own sigma_data under "auto", loss.sigma_data when named explicitly.
    """
    auto = loss.weighting == "auto"
    name = short_prediction(schedule.prediction_type) if auto else loss.weighting  # eps / v / x0 / edm
    sigma_data = schedule.sigma_data if auto and schedule.is_edm else loss.sigma_data
    kwargs = {"min_snr": {"gamma": loss.min_snr_gamma}, "edm": {"sigma_data": sigma_data}}.get(name, {})
    return get_weighting(name, **kwargs)


def make_sigma_sampler(loss: LossConfig, schedule: ScheduleConfig, denoiser):
    """Training noise levels: log-normal for an EDM model, the training timesteps' sigmas for a discrete one.

    A discrete model has sigmas only in [sigma_1, sigma_T] (~0.03 to ~14.6 for SD's schedule): log-normal draws
    outside it would be clamped to the end timesteps (~2.6% of them with EDM's P_mean, P_std), so they are refused.
    An EDM model has no timesteps to draw from, so it always trains with log-normal sigmas.
    """
    if schedule.is_edm:
        return LogNormalSigmaSampler(loss.p_mean, loss.p_std)
    if loss.sigma_sampler == "lognormal":
        raise ConfigError(f"loss.sigma_sampler=lognormal draws continuous sigmas, but model.schedule.prediction_type="
                          f"{schedule.prediction_type} is a discrete model whose {schedule.num_train_timesteps} "
                          f"timesteps cover only sigma in [{denoiser.sigma_min:.3g}, {denoiser.sigma_max:.3g}] (the "
                          "rest would be clamped); set model.schedule.prediction_type=edm to train a continuous-sigma "
                          "EDM model, or loss.sigma_sampler=discrete")
    return DiscreteSigmaSampler(denoiser.schedule)


class DiffusionObjective(nn.Module):
    """What DDP wraps and the optimizer trains: the U-Net denoiser (plus a trained text encoder); returns `b` losses."""

    def __init__(self, parts: LatentDiffusionParts, loss: LossConfig):
        super().__init__()
        self.learned_variance = getattr(parts.unet.config, "learn_sigma", False)
        if self.learned_variance and parts.schedule.is_edm:
            raise ConfigError("a learned-variance U-Net (learn_sigma) trains with the discrete hybrid loss; it cannot "
                              "be an EDM model (model.schedule.prediction_type=edm): set model.unet.learn_sigma=false")
        variance_type = parts.schedule.variance_type
        if self.learned_variance and variance_type == "learned":
            raise ConfigError("the hybrid loss trains the variance half as the interpolation between beta_tilde and "
                              "beta (variance_type learned_range); model.schedule.variance_type=learned would sample "
                              "it as the variance itself: set it to learned_range")
        if self.learned_variance and variance_type in FIXED_VARIANCE_TYPES:
            raise ConfigError(f"a learned-variance U-Net (learn_sigma) trains its variance half with the hybrid loss, "
                              f"but model.schedule.variance_type={variance_type} samples with a fixed variance and "
                              "ignores it: set model.schedule.variance_type=learned_range, or model.unet.learn_sigma="
                              "false for a fixed variance")
        # An SR stage's low-res image enters beside x (`concat`), as at sampling (ldm.pipeline.stage.Stage).
        network = ConcatNetwork(parts.unet) if parts.upscales else parts.unet
        self.denoiser = build_denoiser(network, parts.schedule)
        self.text_encoder = parts.text_encoder if parts.train_text_encoder else None
        self.weighting = make_weighting(loss, parts.schedule)
        self.vlb_weight = loss.vlb_weight
        self.sigma_sampler = make_sigma_sampler(loss, parts.schedule, self.denoiser)

    @property
    def unet(self) -> nn.Module:
        network = self.denoiser.network
        return network.network if isinstance(network, ConcatNetwork) else network

    def forward(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, cond: dict | None = None,
                captions: list[str] | None = None) -> torch.Tensor:
        """Per-sample loss `b` of denoising x0 + sigma * noise; a trained text encoder encodes `captions` here."""
        if self.text_encoder is not None:  # `cond` then holds only the other arguments (an SR stage's low-res image)
            cond = {**text_conditioning(encode_captions(self.text_encoder, captions), self.unet.config),
                    **(cond or {})}
        if self.learned_variance:
            return hybrid_loss(self.denoiser, x0, sigma, cond, weighting=self.weighting, vlb_weight=self.vlb_weight,
                               noise=noise)
        return denoising_loss(self.denoiser, x0, sigma, cond, self.weighting, noise=noise)


def latents_from_posterior(config: AutoencoderConfig, mean: torch.Tensor, std: torch.Tensor,
                           eps: torch.Tensor) -> torch.Tensor:
    """A posterior draw in diffusion space, (mean + std * eps - shift_factor) * scale_factor (AutoencoderConfig)."""
    return (mean + std * eps - config.shift_factor) * config.scale_factor


def check_latent_batch(batch: dict, pixels: bool = False) -> None:
    """Latent shards need `latent_mean`, `latent_std` (not for a pixel model's: the mean is the image) and
    `text_tokens` from the loader; say so clearly otherwise."""
    needed = ("latent_mean", "text_tokens") if pixels else ("latent_mean", "latent_std", "text_tokens")
    missing = [k for k in needed if k not in batch]
    if missing:
        raise LdmError(f"loss.inputs=latents needs latent shards, but the loader gave no {missing} "
                       f"(it gave {sorted(batch)}): make them with data_scripts/precompute_latents.py and set "
                       "data.sample_format=latent; or train from images with loss.inputs=images.")
