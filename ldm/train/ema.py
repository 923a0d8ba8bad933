"""Exponential moving average of weights (Polyak & Juditsky 1992), kept in float32 beside the trained module."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def ema_decay(n: int, decay: float, warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay of the n-th update (n = 0, 1, ...): `decay`, or warmed up min(decay, 1 - (1 + n / inv_gamma) ** -power)."""
    if not warmup:
        return decay
    return min(decay, max(0.0, 1.0 - (1.0 + n / inv_gamma) ** -power))


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after every optimizer step, for the trainable parameters."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = False, inv_gamma: float = 1.0,
                 power: float = 2 / 3):
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {name: params[name].detach().float().clone() for name in self.names}
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(self.num_updates, self.decay, self.warmup, self.inv_gamma, self.power)

    def _pairs(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(module.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA: the module lacks parameters {missing[:3]}")
        return [self.shadow[n] for n in self.names], [params[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards the module's current (unwrapped) parameters."""
        shadow, params = self._pairs(module)
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(shadow, [p.float() for p in params], weight)  # shadow += weight * (param - shadow)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into the module."""
        shadow, params = self._pairs(module)
        for s, p in zip(shadow, params):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """Use the averaged weights inside a `with` block (sampling), then restore the trained ones."""
        _, params = self._pairs(module)
        backup = [p.clone() for p in params]
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def to(self, device: torch.device | str) -> "EMA":
        """Move the shadow weights (e.g. next to the trained parameters)."""
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-friendly): `shadow.<name>` and `num_updates`."""
        state = {f"shadow.{n}": t.detach().contiguous() for n, t in self.shadow.items()}
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow weights and the update count, checking the parameter names."""
        names = {k[len("shadow."):] for k in state if k.startswith("shadow.")}
        if names != set(self.names):
            diff = sorted(names.symmetric_difference(self.names))
            raise KeyError(f"EMA state does not match the model; differing names: {diff[:5]}")
        for n in self.names:
            self.shadow[n].copy_(state[f"shadow.{n}"])
        self.num_updates = int(state["num_updates"])
