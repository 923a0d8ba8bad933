"""Our samplers against k-diffusion's (crowsonkb's `k_diffusion.sampling`) on the same denoiser, sigmas, initial x
and noise. Prints one JSON line per (sampler, options, denoiser, sigmas): max|ours - kd| / max|kd|.

k-diffusion is not a dependency: install it beside the project and point PYTHONPATH at it, e.g.

    python -m pip install --target /tmp/kd --no-deps k-diffusion torchsde trampoline torchdiffeq
    PYTHONPATH=/tmp/kd python tools/parity_kdiffusion.py [--dtype float32] [--steps 12]

Only `k_diffusion/sampling.py` is loaded (its package `__init__` pulls in training dependencies). The noise k-diffusion
draws is replaced by ours: its churn's `torch.randn_like` and its `noise_sampler` draw from a generator seeded like
ours; the Brownian samplers get our `BrownianNoise` on that generator (torchsde's tree is another random path).

DPM fast and DPM adaptive take (sigma_min, sigma_max, n) in k-diffusion: they get the sigma set's first sigma, its last
nonzero one and its number of steps, with torch's default dtype set to the run's (k-diffusion builds its times with
`torch.tensor(sigma)`). k-diffusion's dpm_adaptive sizes one step for the whole batch from the batch's error norm, ours
each image's from its own (docs/samplers.md): it runs image by image, as a batch of one each, against our batch.
"""
import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.diffusion import SAMPLERS, BrownianNoise, ScheduleConfig, karras_sigmas, sampling_plan  # noqa: E402
from ldm.runtime import ImageGenerators, randn  # noqa: E402

SEED = 1234
CHURN = {"s_churn": 2.0, "s_tmin": 0.3, "s_tmax": 5.0, "s_noise": 1.003}  # a window: some steps churn, some not
# (our sampler, k-diffusion's function, options for both, how k-diffusion gets its noise)
CASES = [
    ("euler", "sample_euler", {}, None),
    ("euler", "sample_euler", CHURN, "randn_like"),
    ("heun", "sample_heun", {}, None),
    ("heun", "sample_heun", CHURN, "randn_like"),
    ("euler_a", "sample_euler_ancestral", {}, "fresh"),
    ("euler_a", "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "fresh"),
    ("ddim", "sample_euler_ancestral", {"eta": 0.5}, "fresh"),  # DDIM(eta) in VE = k-diffusion's ancestral Euler
    ("lms", "sample_lms", {}, None),
    ("lms", "sample_lms", {"order": 2}, None),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, None),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}, "fresh"),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"solver_type": "heun"}, "fresh"),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.5, "s_noise": 0.9}, "fresh"),
    ("dpm_2", "sample_dpm_2", {}, None),
    ("dpm_2", "sample_dpm_2", CHURN, "randn_like"),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}, "fresh"),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9}, "fresh"),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {}, "fresh"),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.5, "s_noise": 0.9}, "fresh"),
    ("dpmpp_sde", "sample_dpmpp_sde", {}, "brownian"),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 0.5, "s_noise": 0.9, "r": 0.3}, "brownian"),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}, "fresh"),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}, None),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.9}, "fresh"),
    ("dpm_fast", "sample_dpm_fast", {}, None),
    ("dpm_fast", "sample_dpm_fast", {"eta": 0.5, "s_noise": 0.9}, "fresh"),
    ("dpm_fast", "sample_dpm_fast", {"eta": 1.0}, "fresh"),
    ("dpm_adaptive", "sample_dpm_adaptive", {}, None),
    ("dpm_adaptive", "sample_dpm_adaptive", {"order": 2}, None),
    ("dpm_adaptive", "sample_dpm_adaptive", {"rtol": 0.001, "atol": 0.0001}, None),
    ("dpm_adaptive", "sample_dpm_adaptive", {"rtol": 0.1, "atol": 0.05, "h_init": 0.2}, None),
    ("dpm_adaptive", "sample_dpm_adaptive", {"pcoeff": 0.3, "icoeff": 0.9, "dcoeff": 0.1, "accept_safety": 0.9}, None),
    ("dpm_adaptive", "sample_dpm_adaptive", {"eta": 1.0}, "fresh"),
    ("dpm_adaptive", "sample_dpm_adaptive", {"eta": 0.5, "s_noise": 0.9, "order": 2}, "fresh"),
]
# k-diffusion functions that take (sigma_min, sigma_max[, n]) in place of sigmas
RANGE_SAMPLERS = {"sample_dpm_fast", "sample_dpm_adaptive"}
# float32 rounding that a sampler amplifies: dpm_adaptive's step-size control turns it into other step sizes (an
# accept or reject on the tolerance's edge), so its float32 sample lies ~5e-4 from the float64 one, k-diffusion's too
# (ours 5.2e-4 / 7.8e-4 / 4.9e-4 from float64 where k-diffusion's is 6.0e-4 / 9.8e-4 / 4.6e-4: defaults, PID, tight)
FLOAT32_ROUNDING = {"dpm_adaptive": 1e-3}
# Cases where we differ on purpose (docs/samplers.md): reported with status "known", not "DIFF".
KNOWN = {
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", (("eta", 1.5),), "fresh"):
        "eta large enough that sigma_up = sigma_next leaves sigma_down = 0: k-diffusion then skips the noise and "
        "lands on the denoised estimate; we add noise of std sigma_next, as its euler_a and dpmpp_2s_ancestral do",
}


def load_kdiffusion_sampling():
    """`k_diffusion/sampling.py` alone, with the one helper it takes from `k_diffusion.utils` (loaded once)."""
    if "k_diffusion.sampling" in sys.modules:  # the stub package below has no spec for find_spec to read
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        sys.exit("k-diffusion is not importable: install it and set PYTHONPATH (see this script's docstring)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, ndim: x[(...,) + (None,) * (ndim - x.ndim)]
    package.utils = utils
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    path = Path(package.__path__[0]) / "sampling.py"
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules["k_diffusion.sampling"] = module
    return module


def gaussian_denoiser(x, sigma, cond=None):
    """The exact denoiser of N(0.5, 0.7^2) data."""
    sigma = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return 0.5 + 0.49 / (0.49 + sigma**2) * (x - 0.5)


class ConvDenoiser(torch.nn.Module):
    """A tiny random-init conv network with EDM preconditioning (sigma_data 0.5): a nonlinear denoiser."""

    def __init__(self, channels: int = 3, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(channels + 1, 16, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(16, channels, 3, padding=1)).to(dtype)

    def forward(self, x, sigma, cond=None):
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        c_in, c_noise = 1 / (sigma**2 + 0.25).sqrt(), sigma.log() / 4
        h = torch.cat([x * c_in, c_noise.expand(-1, 1, *x.shape[2:])], dim=1)
        return c_skip * x + c_out * self.net(h)


class _Torch(types.SimpleNamespace):
    """`torch` for k-diffusion's module, with `randn_like` drawing from our generator (its churn noise)."""

    def __init__(self, generator):
        super().__init__(randn_like=lambda x: randn(x.shape, generator, x.dtype))

    def __getattr__(self, name):
        return getattr(torch, name)


def run_case(kd, ours_name, kd_name, options, noise, denoiser, sigmas, x):
    if kd_name in RANGE_SAMPLERS:
        return run_range_case(getattr(kd, kd_name), SAMPLERS[ours_name], options, noise, denoiser, sigmas, x)
    ours = SAMPLERS[ours_name](denoiser, x.clone(), sigmas, None, generator=torch.Generator().manual_seed(SEED),
                               **options)
    generator = torch.Generator().manual_seed(SEED)
    kwargs = dict(options)
    if noise == "fresh":
        kwargs["noise_sampler"] = lambda sigma, sigma_next: randn(x.shape, generator, x.dtype)
    elif noise == "brownian":
        kwargs["noise_sampler"] = BrownianNoise(x, generator)
    kd.torch = _Torch(generator) if noise == "randn_like" else torch
    try:
        ref = getattr(kd, kd_name)(denoiser, x.clone(), sigmas, disable=True, **kwargs)
    finally:
        kd.torch = torch
    return ((ours - ref).abs().max() / ref.abs().max()).item(), ref.abs().max().item()


def run_range_case(function, ours_function, options, noise, denoiser, sigmas, x):
    """DPM fast / adaptive: k-diffusion over our sigmas' range (sigmas[0], the last nonzero one, len(sigmas) - 1
    evaluations for fast), in x's dtype. Adaptive runs k-diffusion image by image, image k's noise from seed SEED + k
    (ours: per-image generators of those seeds, `ImageGenerators`)."""
    nonzero = sigmas[sigmas > 0]
    sigma_min, sigma_max = nonzero[-1].item(), sigmas[0].item()
    fast = function.__name__ == "sample_dpm_fast"
    generator = torch.Generator().manual_seed(SEED) if fast else ImageGenerators([SEED + k for k in range(len(x))])
    ours = ours_function(denoiser, x.clone(), sigmas, None, generator=generator, **options)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)  # k-diffusion's times: torch.tensor(sigma), float32 otherwise
    try:
        if fast:
            generator = torch.Generator().manual_seed(SEED)
            kwargs = {**options, "noise_sampler": lambda sigma, sigma_next: randn(x.shape, generator, x.dtype)}
            ref = function(denoiser, x.clone(), sigma_min, sigma_max, len(sigmas) - 1, disable=True, **kwargs)
        else:
            ref = torch.cat([function(denoiser, x[k:k + 1].clone(), sigma_min, sigma_max, disable=True,
                                      noise_sampler=_fresh_noise(x[k:k + 1], SEED + k), **options)
                             for k in range(len(x))])
    finally:
        torch.set_default_dtype(dtype)
    return ((ours - ref).abs().max() / ref.abs().max()).item(), ref.abs().max().item()


def _fresh_noise(x, seed):
    """k-diffusion's `noise_sampler`: a fresh normal like x per call, from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: randn(x.shape, generator, x.dtype)


def _status(rel: float, rounding: float, case) -> str:
    if rel <= rounding:
        return "ok"
    ours_name, kd_name, options, noise = case
    return "known" if (ours_name, kd_name, tuple(options.items()), noise) in KNOWN else "DIFF"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", nargs="*", help="our sampler names to run (default: all with a k-diffusion peer)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    kd = load_kdiffusion_sampling()
    sigma_sets = {
        "karras": karras_sigmas(args.steps, 0.0292, 14.6146).to(dtype),
        "discrete": sampling_plan(ScheduleConfig(), "euler", args.steps).sigmas.to(dtype),  # SD's VP schedule
        # DPM fast / adaptive's own plan: SD's whole sigma range, no final 0 (only they walk it)
        "sigma_range": sampling_plan(ScheduleConfig(), "dpm_fast", args.steps).sigmas.to(dtype),
    }
    denoisers = {"gaussian": gaussian_denoiser, "convnet": ConvDenoiser(dtype=dtype).eval()}
    rounding = 1e-12 if dtype == torch.float64 else 1e-5
    known = [(ours, kd_name, dict(options), noise) for ours, kd_name, options, noise in KNOWN]
    for ours_name, kd_name, options, noise in CASES + known:
        if args.only and ours_name not in args.only:
            continue
        for den_name, denoiser in denoisers.items():
            for sig_name, sigmas in sigma_sets.items():
                if sig_name == "sigma_range" and kd_name not in RANGE_SAMPLERS:
                    continue
                x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=dtype) * sigmas[0]
                with torch.no_grad():
                    rel, scale = run_case(kd, ours_name, kd_name, options, noise, denoiser, sigmas, x)
                print(json.dumps({"sampler": ours_name, "k_diffusion": kd_name, "options": options,
                                  "denoiser": den_name, "sigmas": sig_name, "dtype": args.dtype,
                                  "max_rel_diff": float(f"{rel:.3g}"), "max_abs_kd": round(scale, 4),
                                  "status": _status(rel, FLOAT32_ROUNDING.get(ours_name, rounding) if
                                                    dtype == torch.float32 else rounding,
                                                    (ours_name, kd_name, options, noise))}))


if __name__ == "__main__":
    main()
