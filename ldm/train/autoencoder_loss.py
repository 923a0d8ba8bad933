"""The KL-autoencoder objective of latent diffusion (Rombach et al. 2022, app. G; Esser et al. 2021, sec. 3.1).

Autoencoder: L = NLL + kl_weight * KL + lambda * disc_factor * L_GAN, where
  NLL   = sum_chw (|x - x_rec| + perceptual_weight * LPIPS(x, x_rec)) / exp(logvar) + logvar, averaged over the batch,
  KL    = KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch,
  L_GAN = -E[D(x_rec)],   lambda = disc_weight * ||grad_L NLL|| / (||grad_L L_GAN|| + 1e-4)  (L: the decoder's last layer).
Discriminator: hinge loss on real vs. reconstructed images, from step `disc_start` on.
The sums over pixels (not means) are what make LDM's kl_weight = 1e-6 the right scale; keep them when comparing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.train.discriminator import GAN_LOSSES, PatchDiscriminator, d_loss, generator_adv_loss
from ldm.train.lpips import build_lpips

REC_LOSSES = ("l1", "l2")


@dataclass
class AutoencoderLossConfig:
    """Weights of the reconstruction, KL, perceptual and adversarial terms, and the discriminator's shape."""

    rec_loss: str = "l1"  # "l1" | "l2": per-pixel reconstruction error
    kl_weight: float = 1e-6  # on the summed KL (LDM's "KL-reg" f8 autoencoders)
    perceptual_weight: float = 1.0  # LPIPS; used only when its weights are found (see ldm/train/lpips.py)
    lpips_weights: str | None = None  # folder with the VGG-16 and LPIPS files; None = $LDM_LPIPS_WEIGHTS
    lpips_required: bool = False  # true: missing LPIPS weights are an error instead of a warning
    learn_logvar: bool = False  # a learned scalar output log-variance (CompVis `logvar`); trained with the autoencoder
    logvar_init: float = 0.0
    disc_start: int = 50001  # optimizer step from which the GAN terms are on (both networks)
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_factor: float = 1.0  # multiplies both GAN losses once they are on
    adaptive_weight: bool = True  # false: lambda = disc_weight, constant
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    disc_layers: int = 3  # PatchGAN depth (3: 70x70 patches)
    disc_channels: int = 64
    disc_norm: str = "batch"  # "batch" (pix2pix) | "group" | "none"

    def __post_init__(self):
        if self.rec_loss not in REC_LOSSES:
            raise ConfigError(f"loss.rec_loss must be one of {list(REC_LOSSES)}, got {self.rec_loss!r}")
        if self.disc_loss not in GAN_LOSSES:
            raise ConfigError(f"loss.disc_loss must be one of {list(GAN_LOSSES)}, got {self.disc_loss!r}")
        if min(self.kl_weight, self.perceptual_weight, self.disc_weight, self.disc_factor) < 0:
            raise ConfigError("loss weights (kl_weight, perceptual_weight, disc_weight, disc_factor) must be >= 0")


def reconstruction_error(x: torch.Tensor, rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-element |x - rec| or (x - rec)^2, `b c h w`."""
    diff = x.float() - rec.float()
    return diff.abs() if kind == "l1" else diff.pow(2)


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0, max_weight: float = 1e4) -> torch.Tensor:
    """disc_weight * clamp(||d nll / d W|| / (||d g / d W|| + 1e-4), 0, max_weight), detached (eq. 7 of Esser et al. 2021)."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters that take no gradient inside the block (the discriminator while it scores the autoencoder)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AutoencoderLoss(nn.Module):
    """Holds the discriminator and the frozen LPIPS; gives the autoencoder's and the discriminator's losses."""

    def __init__(self, config: AutoencoderLossConfig, in_channels: int = 3):
        super().__init__()

        self.config = config
        self.discriminator = PatchDiscriminator(in_channels, config.disc_channels, config.disc_layers, config.disc_norm)
        self.lpips = build_lpips(config.lpips_weights, config.lpips_required) if config.perceptual_weight > 0 else None

    def disc_active(self, step: int) -> bool:
        """Whether the GAN terms are on at optimizer step `step` (0-based)."""
        return step >= self.config.disc_start and self.config.disc_factor > 0

    def generator_loss(self, x: torch.Tensor, rec: torch.Tensor, posterior, logvar: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss for images `x` and reconstructions `rec` (b c h w in [-1, 1]), with logs."""
        c = self.config
        b = x.shape[0]
        error = reconstruction_error(x, rec, c.rec_loss)
        logs = {"rec_loss": error.mean().detach()}
        if self.lpips is not None and c.perceptual_weight > 0:
            perceptual = self.lpips(x.float(), rec.float()).float()  # b 1 1 1, added to every pixel's error
            error = error + c.perceptual_weight * perceptual
            logs["lpips"] = perceptual.mean().detach()
        logvar = logvar.float()
        nll_loss = (error / torch.exp(logvar) + logvar).sum() / b
        kl_loss = posterior.kl().float().sum() / b
        loss = nll_loss + c.kl_weight * kl_loss
        logs.update(nll_loss=nll_loss.detach(), kl_loss=kl_loss.detach(), logvar=logvar.detach())
        if self.disc_active(step):
            with frozen(self.discriminator):  # gradients reach the reconstruction, not the discriminator
                g_loss = generator_adv_loss(self.discriminator(rec.float()).float())
            if c.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, c.disc_weight)
            else:
                d_weight = torch.tensor(c.disc_weight, device=x.device)
            loss = loss + d_weight * c.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, rec: torch.Tensor, step: int,
                           discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real `x` against detached reconstructions; `discriminator` may be DDP-wrapped."""
        discriminator = discriminator if discriminator is not None else self.discriminator
        logits_real = discriminator(x.detach().float()).float()
        logits_fake = discriminator(rec.detach().float()).float()
        factor = self.config.disc_factor if self.disc_active(step) else 0.0
        loss = factor * d_loss(self.config.disc_loss, logits_real, logits_fake)
        return loss, {"disc_loss": loss.detach(), "logits_real": logits_real.mean().detach(),
                      "logits_fake": logits_fake.mean().detach()}
