"""The diffusion core: schedules, parameterisations, denoisers, samplers, guidance and losses (no networks)."""
from ldm.diffusion.brownian import BrownianNoise
from ldm.diffusion.denoiser import DiscreteDenoiser, Denoiser, EDMDenoiser, append_dims, batch_sigma, build_denoiser
from ldm.diffusion.dpm_singlestep import sample_dpm_adaptive, sample_dpm_fast
from ldm.diffusion.dpm_solvers import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from ldm.diffusion.guidance import cfg, classifier_grad, classifier_guidance, dynamic_threshold, rescale_guidance
from ldm.diffusion.learned_variance import (
    discretized_gaussian_log_likelihood,
    interpolate_log_variance,
    log_variance_bounds,
    normal_kl,
    posterior,
    vlb_term,
)
from ldm.diffusion.losses import (
    DiscreteSigmaSampler,
    EDMWeighting,
    LogNormalSigmaSampler,
    MinSNRWeighting,
    WEIGHTINGS,
    add_noise,
    denoising_loss,
    eps_weighting,
    get_weighting,
    hybrid_loss,
    v_weighting,
    x0_weighting,
)
from ldm.diffusion.plans import SamplingPlan, edm_sampling_plan, sampling_plan
from ldm.diffusion.sampler_registry import (
    SAMPLERS,
    TIMESTEP_KINDS,
    SamplerSpec,
    check_sampler_options,
    get_sampler,
    register_sampler,
    run_sampler,
    sampler_names,
    unregister_sampler,
)
from ldm.diffusion.samplers import (
    ancestral_step,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_unipc,
)
from ldm.diffusion.scalings import EDMScaling, EpsScaling, VScaling, X0Scaling, scaling_for
from ldm.diffusion.schedules import (
    DiscreteSchedule,
    ScheduleConfig,
    beta_sigmas,
    cosine_betas,
    exponential_sigmas,
    karras_sigmas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)
