"""Noise for SDE solvers that look at a step's midpoint: increments of one Brownian path W(sigma), from a generator.

DPM-Solver++ SDE (and any solver that adds noise on the way to a step's midpoint and again over the whole step)
needs the two noises to be increments of the *same* Brownian path: W(sigma_mid) - W(sigma) and
W(sigma_next) - W(sigma) overlap, so they are correlated. k-diffusion and diffusers get such a path from
torchsde's Brownian tree, seeded by an integer. `BrownianNoise` draws the same path (the same joint law of every
increment it is asked for) from a torch.Generator instead: the path is built top-down as the sampler walks sigma
down, one normal draw per new point, W(b) = W(a) + sqrt(a - b) z. A sampler that asks only for whole steps
(sigma_i to sigma_{i+1}) gets one fresh normal per step, the stream the other samplers draw. It is not torchsde's
path (its values depend on torchsde's own random tree), so a seed does not give k-diffusion's image.
"""
from __future__ import annotations

import math

import torch

from ldm.runtime import randn


class BrownianNoise:
    """`noise(sigma, sigma_next)`: (W(sigma_next) - W(sigma)) / sqrt(|sigma - sigma_next|), a standard normal."""

    def __init__(self, x: torch.Tensor, generator=None, keep: int = 4):
        self.x, self.generator, self.keep = x, generator, keep
        self.points: list[tuple[float, torch.Tensor]] = []  # (sigma, W(sigma)), sigma decreasing

    def _draw(self) -> torch.Tensor:
        x = self.x
        if self.generator is None:
            return torch.randn_like(x)
        return randn(x.shape, self.generator, x.dtype).to(x.device)

    def at(self, sigma: float) -> torch.Tensor:
        """W(sigma): a point already drawn, or a new one below all of them (the path only grows downwards)."""
        sigma = float(sigma)
        for known, w in self.points:
            if math.isclose(known, sigma, rel_tol=1e-6, abs_tol=1e-12):
                return w
        if not self.points:
            w = torch.zeros_like(self.x)  # W at the first point asked for is 0: only increments matter
        elif sigma < self.points[-1][0]:
            lowest, w_low = self.points[-1]
            w = w_low + math.sqrt(lowest - sigma) * self._draw()
        else:
            raise ValueError(f"BrownianNoise walks sigma downwards: {sigma} lies above {self.points[-1][0]}")
        self.points = (self.points + [(sigma, w)])[-self.keep:]
        return w

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        w = self.at(sigma)  # first: the path starts at the higher point
        return (self.at(sigma_next) - w) / math.sqrt(abs(sigma - sigma_next))
