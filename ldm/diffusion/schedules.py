"""Noise schedules: beta schedules, zero-terminal-SNR rescaling, sampling sigmas (Karras, exponential, beta), and
discrete timestep <-> sigma maps."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from ldm.config import from_dict
from ldm.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "edm")
# The short names (CompVis' `parameterization`, and the loss weightings) of diffusers' prediction types.
PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# What a discrete-timestep network's output may be: the weights cannot tell these apart, so a loader may be told
# (`load_model(prediction_type=)`, `--prediction-type`); "edm" is a schedule a model's own config declares.
NETWORK_PREDICTIONS = PREDICTION_TYPES[:3]
# Fields only an EDM (continuous-sigma) model uses, with EDM's defaults (Karras et al. 2022, Table 1 and Sec. 5).
EDM_DEFAULTS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# The scheduler-config keys that replace the spaced timesteps' sigmas (diffusers allows one at a time).
SIGMA_CONFIG_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# diffusers' DDPMScheduler variance types. A fixed one is the DDPM sampler's variance whatever the network outputs
# (IFPipeline drops a learned half when the scheduler says fixed): beta_tilde for fixed_small, beta for fixed_large.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
FIXED_VARIANCE_TYPES = VARIANCE_TYPES[:4]
# The terminal alpha_cumprod that stands in for 0 under zero terminal SNR (diffusers' Euler/DPM choice, fp16's
# smallest subnormal): it keeps the first sigma finite (~4096) in variance-exploding coordinates.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def canonical_prediction(name: str) -> str:
    """diffusers' name of a prediction type ("eps" -> "epsilon", "v" -> "v_prediction", "x0" -> "sample")."""
    name = PREDICTION_ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction type {name!r}; use one of {', '.join(PREDICTION_TYPES)} "
                          f"(or {', '.join(PREDICTION_ALIASES)})")
    return name


def short_prediction(name: str) -> str:
    """The short name of a prediction type ("epsilon" -> "eps"; "edm" stays "edm")."""
    return {v: k for k, v in PREDICTION_ALIASES.items()}.get(canonical_prediction(name), name)


def linear_betas(n: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas spaced linearly (Ho et al. 2020, Sec. 4)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)


def scaled_linear_betas(n: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Square roots of the betas spaced linearly: the Latent Diffusion / Stable Diffusion schedule."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2) for t in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = min(1 - alpha_bar(t/T) / alpha_bar((t-1)/T), max_beta) (Nichol & Dhariwal 2021, Sec. 3.2)."""
    betas = [min(1 - cosine_alpha_bar((i + 1) / n, s) / cosine_alpha_bar(i / n, s), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar): SNR 0 at the last step, the first unchanged (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n noise levels spaced uniformly in sigma^(1/rho) (Karras et al. 2022, eq. 5), followed by a final 0: (n+1,).
    Computed in float64 and returned in `dtype`."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in log sigma, followed by a final 0: (n+1,)
    (k-diffusion's `get_sigmas_exponential`, diffusers' use_exponential_sigmas)."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


# The Beta(alpha, beta) distribution whose quantiles place beta sigmas: diffusers' fixed 0.6, 0.6 (Lee et al. 2024,
# "Beta Sampling is All You Need", arXiv:2407.12173), denser at both ends of the sigma range than in the middle.
BETA_SIGMAS_ALPHA = BETA_SIGMAS_BETA = 0.6


def beta_sigmas(n: int, sigma_min: float, sigma_max: float, alpha: float = BETA_SIGMAS_ALPHA,
                beta: float = BETA_SIGMAS_BETA, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min: sigma_min + q (sigma_max - sigma_min) at the Beta(alpha, beta)
    quantiles q of 1 - linspace(0, 1, n) (diffusers' use_beta_sigmas), followed by a final 0: (n+1,)."""
    import scipy.stats  # ~0.3 s to import, and only beta sigmas need it

    quantiles = torch.from_numpy(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta))
    sigmas = sigma_min + quantiles * (sigma_max - sigma_min)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


@dataclass
class ScheduleConfig:
    """A model's noise schedule, with the keys (and meaning) of a diffusers scheduler config.

    prediction_type "epsilon" | "v_prediction" | "sample": a network trained on `num_train_timesteps` discrete
    timesteps of the beta schedule. "edm": a continuous-sigma network with EDM preconditioning (Karras et al. 2022,
    Table 1), described by sigma_min, sigma_max, sigma_data and rho alone; the beta/timestep fields are then unused.
    The four EDM fields are None (unused) for the discrete types and default to EDM's values for "edm".
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | cosine (= diffusers' squaredcos_cap_v2)
    trained_betas: list[float] | None = None  # explicit betas override beta_schedule
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample | edm
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str | None = None  # leading | trailing | linspace; None = each sampler's diffusers default
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None  # DDIM's final alpha; None = diffusers' default (True)
    # Sampling choices a diffusers scheduler_config.json carries (plans.py; the samplers whose diffusers peer reads
    # them, `SamplerSpec.config_keys`): Karras-spaced sigmas (Karras et al. 2022, eq. 5), log-spaced ones
    # (exponential) or Beta(0.6, 0.6) quantiles (beta) in place of the spaced timesteps, at most one of the three;
    # and the last sigma, 0 ("zero") or the first training sigma ("sigma_min").
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    final_sigmas_type: str = "zero"  # zero | sigma_min
    # diffusers' DDPM / DDIM clip x0 to [-clip_sample_range, clip_sample_range] when dynamic thresholding is off
    # (DeepFloyd IF's configs say true); ldm does so for every sampler of a pixel model, never for a latent one
    # (`Stage.thresholding`)
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # The DDPM sampler's reverse variance (VARIANCE_TYPES). None or learned_range: the network's learned half where
    # it has one (IF's 6 output channels) as the interpolation between log beta_tilde and log beta; learned: that half
    # as the variance itself (diffusers); else fixed_small. A fixed type overrides a learned half, as diffusers does;
    # fixed_small_log is fixed_small, fixed_large_log is fixed_large (diffusers' own step makes NaN of it)
    variance_type: str | None = None
    sigma_min: float | None = None  # edm: lowest sampling sigma (default 0.002)
    sigma_max: float | None = None  # edm: highest sampling sigma = std of the initial noise (default 80)
    sigma_data: float | None = None  # edm: std of the training data, sets the preconditioning (default 0.5)
    rho: float | None = None  # edm: Karras sigma spacing exponent (default 7)

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2"):
            raise ConfigError(
                f"schedule: unknown beta_schedule {self.beta_schedule!r}; use linear, scaled_linear or cosine"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"schedule: unknown prediction_type {self.prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(f"schedule: unknown timestep_spacing {self.timestep_spacing!r}; "
                              f"use one of {', '.join(TIMESTEP_SPACINGS)}")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ConfigError(f"schedule: unknown final_sigmas_type {self.final_sigmas_type!r}; "
                              f"use one of {', '.join(FINAL_SIGMAS_TYPES)}")
        if self.variance_type is not None and self.variance_type not in VARIANCE_TYPES:
            raise ConfigError(f"schedule: unknown variance_type {self.variance_type!r}; use one of "
                              f"{', '.join(VARIANCE_TYPES)}")
        chosen = [key for key in SIGMA_CONFIG_KEYS if getattr(self, key)]
        if len(chosen) > 1:
            raise ConfigError(f"schedule: {' and '.join(chosen)} are both set; a schedule samples one kind of sigmas, "
                              "so set at most one of them")
        if not self.clip_sample_range > 0:
            raise ConfigError(f"schedule: clip_sample_range={self.clip_sample_range} must be positive")
        if self.prediction_type != "edm":
            given = [name for name in EDM_DEFAULTS if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"schedule: {', '.join(given)} only apply to prediction_type edm (a continuous-sigma "
                                  f"model); remove them, or set prediction_type: edm")
            return
        for name, default in EDM_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if not (0 < self.sigma_min < self.sigma_max and self.sigma_data > 0 and self.rho > 0):
            raise ConfigError(f"schedule: edm needs 0 < sigma_min < sigma_max, sigma_data > 0 and rho > 0; got "
                              f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
                              f"sigma_data={self.sigma_data}, rho={self.rho}")

    @property
    def is_edm(self) -> bool:
        """Whether this is a continuous-sigma EDM model (no discrete timesteps)."""
        return self.prediction_type == "edm"

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "ScheduleConfig":
        """Read a diffusers `scheduler_config.json` dict, ignoring keys that do not describe the schedule.

        diffusers' EDM schedulers (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) become prediction_type "edm"
        with their sigma_min / sigma_max / sigma_data / rho (their "epsilon" is EDM's preconditioned F); sampling
        uses Karras sigmas whatever their sigma_schedule. Other schedulers' sigma_min / sigma_max (diffusers' Euler
        has them for Karras sigmas at inference) do not describe the trained model and are dropped. A DDPM or DDIM
        config without `clip_sample` clips, as those schedulers do by default (only pixel stages ever clip).
        """
        config = dict(config)
        class_name = str(config.get("_class_name", ""))
        if class_name.startswith("EDM"):
            prediction = config.get("prediction_type", "epsilon")
            if prediction != "epsilon":
                raise ConfigError(f"scheduler config: {class_name} with prediction_type {prediction!r} is not "
                                  "supported; only EDM's own preconditioning (diffusers' 'epsilon') is")
            config["prediction_type"] = "edm"
        if class_name in ("DDPMScheduler", "DDIMScheduler"):  # their own default is to clip (a pixel model's x0)
            config.setdefault("clip_sample", True)
        names = {f.name for f in dataclasses.fields(cls)}
        if config.get("prediction_type") != "edm":
            names -= set(EDM_DEFAULTS)
        return from_dict(cls, {k: v for k, v in config.items() if k in names}, where="scheduler config")

    def betas(self) -> torch.Tensor:
        """The (num_train_timesteps,) betas this config describes, float32 as diffusers builds them."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = linear_betas(n, self.beta_start, self.beta_end)
        elif self.beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(n, self.beta_start, self.beta_end)
        else:
            betas = cosine_betas(n)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas


# Sampling keys of diffusers' schedulers that no ldm plan reproduces, with the values that change nothing.
UNREPRODUCED_SAMPLING_KEYS = {"use_lu_lambdas": False, "use_flow_sigmas": False, "interpolation_type": "linear",
                              "timestep_type": "discrete"}
# DPM-Solver's choices of order on the last step: they change a step to sigma_min, never one to sigma 0.
FINAL_ORDER_KEYS = {"euler_at_final": False, "lower_order_final": True}


def unreproduced_sampling_keys(config: Mapping[str, Any]) -> list[str]:
    """The `key=value` settings of a diffusers scheduler config that ldm's plans do not follow (a load note says so:
    the images then differ from that scheduler's). Karras sigmas between a config's own sigma_min / sigma_max count
    too (exponential and beta ones alike): ldm's span the schedule's range."""
    keys = dict(UNREPRODUCED_SAMPLING_KEYS)
    if config.get("final_sigmas_type") == "sigma_min":
        keys.update(FINAL_ORDER_KEYS)
    found = [f"{k}={config[k]!r}" for k, plain in keys.items() if config.get(k, plain) not in (plain, None)]
    edm = str(config.get("_class_name", "")).startswith("EDM") or config.get("prediction_type") == "edm"
    if any(config.get(key) for key in SIGMA_CONFIG_KEYS) and not edm:
        found += [f"{k}={config[k]!r}" for k in ("sigma_min", "sigma_max") if config.get(k) is not None]
    return found


def sampling_keys_note(config: Mapping[str, Any]) -> str | None:
    """A load note naming the scheduler config's unreproduced sampling settings, or None when there are none."""
    found = unreproduced_sampling_keys(config)
    if not found:
        return None
    return (f"scheduler_config.json asks for {', '.join(found)}, which ldm's samplers do not reproduce: images differ "
            "from that diffusers scheduler's (docs/samplers.md, \"A model's scheduler config\")")


class DiscreteSchedule:
    """The sigmas of a model trained on discrete timesteps, with t <-> sigma maps that are exact inverses.

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (variance-exploding form of the VP process, Karras et al. 2022
    Table 1). Between integer t, sigma is interpolated linearly in t (as diffusers' `np.interp(t, arange, sigmas)`),
    so a float timestep -> sigma -> timestep round trip is exact. An alpha_bar of 0 (zero terminal SNR) is replaced
    by 2**-24, as diffusers' Euler and DPM-Solver schedulers do, so every sigma is finite.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().cpu().clone()
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor of at least two timesteps")
        alphas_cumprod[alphas_cumprod <= 0] = ZERO_SNR_ALPHA_CUMPROD
        self.alphas_cumprod = alphas_cumprod
        # sigma in the dtype alpha_bar came in (float32 for diffusers parity), interpolated in float64.
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        if not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("sigmas must increase strictly with t (alphas_cumprod must decrease)")
        self._table = self.sigmas.double()
        # numpy's float32 log, bit for bit the log table diffusers' `_sigma_to_t` interpolates in (`log_sigma_to_t`)
        self._log_sigmas = torch.from_numpy(np.log(self.sigmas.float().numpy()))
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._log_tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "DiscreteSchedule":
        """Build the schedule a `ScheduleConfig` describes (a discrete one: an EDM model has no timesteps)."""
        if config.is_edm:
            raise ConfigError("schedule: prediction_type edm is a continuous-sigma model with no discrete timesteps; "
                              "use ldm.diffusion.denoiser.build_denoiser / plans.sampling_plan, which handle it")
        return cls(torch.cumprod(1 - config.betas(), dim=0))

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _sigmas_on(self, device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        if device not in self._tables:
            self._tables[device] = self._table.to(device=device, dtype=dtype)
        return self._tables[device]

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (float) timestep t, linear in t between training timesteps; float64 (float32 on MPS)."""
        t = torch.as_tensor(t)
        table = self._sigmas_on(t.device)
        t = t.to(table.dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return table[low] + w * (table[low + 1] - table[low])

    def sigma_to_t(self, sigma: torch.Tensor, snap: float = 1e-4) -> torch.Tensor:
        """The exact inverse of `t_to_sigma` (piecewise linear in sigma); t within `snap` of an integer is rounded."""
        sigma = torch.as_tensor(sigma)
        table = self._sigmas_on(sigma.device)
        s = sigma.to(table.dtype)
        low = (torch.searchsorted(table, s.contiguous(), right=True) - 1).clamp(0, self.num_timesteps - 2)
        t = low + (s - table[low]) / (table[low + 1] - table[low])
        t = t.clamp(0, self.num_timesteps - 1)
        # A float32 sigma of an integer timestep comes back within ~1e-5 of it: give the integer back exactly.
        nearest = t.round()
        return torch.where((t - nearest).abs() < snap, nearest, t)

    def log_sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep diffusers' `_sigma_to_t` gives a sigma: t linear in log sigma between training timesteps, over
        the float32 logs of the sigmas (as diffusers takes them); float64 (float32 on MPS). What its Euler-family
        schedulers feed the network at Karras, exponential and beta sigmas and at KDPM2's / DPM++ SDE's midpoints."""
        sigma = torch.as_tensor(sigma)
        if sigma.device not in self._log_tables:
            dtype = self._sigmas_on(sigma.device).dtype
            self._log_tables[sigma.device] = self._log_sigmas.to(device=sigma.device, dtype=dtype)
        log_table = self._log_tables[sigma.device]
        s = sigma.to(log_table.dtype).clamp_min(1e-10).log()
        low = (torch.searchsorted(log_table, s.contiguous(), right=True) - 1).clamp(0, self.num_timesteps - 2)
        w = ((s - log_table[low]) / (log_table[low + 1] - log_table[low])).clamp(0, 1)
        return low + w

    def sigma_prev(self, t: torch.Tensor) -> torch.Tensor:
        """sigma of the training timestep before integer t (0 before t = 0): the DDPM chain's next noise level."""
        t = torch.as_tensor(t).long()
        table = self._sigmas_on(t.device)
        prev = table[(t - 1).clamp(min=0)]
        return torch.where(t > 0, prev, torch.zeros_like(prev))
