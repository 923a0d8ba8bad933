"""PatchGAN discriminator (Isola et al. 2017, pix2pix) and the GAN losses of VQGAN / LDM autoencoder training."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import ConfigError

NORMS = ("batch", "group", "none")
GAN_LOSSES = ("hinge", "vanilla")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":  # pix2pix and taming-transformers use BatchNorm
        return nn.BatchNorm2d(channels)
    if kind == "group":  # batch-independent: the same logits whatever the per-rank batch size
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """`b c H W` image -> `b 1 h w` real/fake logits, each judging one receptive-field patch (70x70 for 3 layers)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"discriminator norm must be one of {list(NORMS)}, got {norm!r}")
        if n_layers < 1 or channels < 1:
            raise ConfigError(f"discriminator needs n_layers >= 1 and channels >= 1, got {n_layers}, {channels}")
        bias = norm == "none"  # a normalisation that follows makes the bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, n_layers + 1):  # n_layers - 1 stride-2 convolutions, then one stride-1
            out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias), _norm(norm, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN initialisation (Radford et al. 2016): conv weights N(0, 0.02), norm scales N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017): (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator (Goodfellow et al. 2014): BCE with logits, real = 1, fake = 0."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def d_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator loss named by `kind` ("hinge" or "vanilla")."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ConfigError(f"loss.disc_loss must be one of {list(GAN_LOSSES)}, got {kind!r}")


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss -E[D(x_rec)] (the generator side of the hinge GAN, as VQGAN)."""
    return -logits_fake.mean()
