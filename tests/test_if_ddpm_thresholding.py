"""A DeepFloyd IF stage's sampling loop against diffusers' on real numbers: classifier-free guidance on the eps,
the learned-range variance of the conditional half, then x0 thresholded (dynamic at 0.95 capped at 1.5, or static
clipping where the scheduler says `clip_sample` and thresholding is off) before DDPMScheduler's posterior step.

IFPipeline's loop is written out here over diffusers' DDPMScheduler, so the test needs neither weights nor a text
encoder; ldm's side is `ldm.pipeline.sampling.sample` on a `Stage` built from the same scheduler config."""
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close_to_ref

from ldm.diffusion.schedules import ScheduleConfig
from ldm.errors import ConfigError, LdmError
from ldm.diffusion.noise_augmentation import StageConfig
from ldm.models.codecs import IdentityCodec
from ldm.pipeline.sampling import sample
from ldm.pipeline.settings import GenerationSettings
from ldm.pipeline.stage import Stage

diffusers = pytest.importorskip("diffusers")

IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                    prediction_type="epsilon", dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
STEPS, GUIDANCE, SHAPE = 8, 4.0, (1, 3, 8, 8)


class VarianceNet(torch.nn.Module):
    """eps and a learned-range variance output [-1, 1] that depend on x, the timestep and the text."""

    def __init__(self, seed: int):
        super().__init__()
        self.config = SimpleNamespace()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(6, 3, generator=g) / 3**0.5)
        self.register_buffer("b", 0.3 * torch.randn(6, generator=g))

    def forward(self, x, t, context=None):
        h = torch.einsum("oc,bchw->bohw", self.w, x) + self.b.view(1, 6, 1, 1)
        h = h * torch.cos(t.float() / 400).view(-1, 1, 1, 1) + 0.5 * context.view(-1, 1, 1, 1)
        return torch.cat([1.5 * h[:, :3], torch.tanh(h[:, 3:])], dim=1)


def diffusers_loop(net, scheduler_config, text, seed=0, scheduler_class="DDPMScheduler", **step_kwargs):
    """IFPipeline's denoising loop (guidance on the eps half, the text half's variance) over DDPMScheduler, or over
    another scheduler IFPipeline runs with IF's config (`from_config`: DPMSolverMultistepScheduler)."""
    scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = net(torch.cat([x, x]), t.repeat(2), context=torch.cat([text["uncond"], text["cond"]]))
        uncond, cond = out.chunk(2)
        eps_uncond, eps_cond, variance = uncond[:, :3], cond[:, :3], cond[:, 3:]
        out = eps_uncond + GUIDANCE * (eps_cond - eps_uncond)
        if scheduler_config["variance_type"] in ("learned", "learned_range"):  # IFPipeline keeps the half for both
            out = torch.cat([out, variance], dim=1)
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def ldm_sample(net, scheduler_config, text, seed=0, dynamic_threshold=None, sampler="ddpm"):
    schedule = ScheduleConfig.from_diffusers(scheduler_config)
    thresholding = scheduler_config["thresholding"]
    stage_config = StageConfig(resolution=SHAPE[-1], dynamic_threshold=0.95 if thresholding else None,
                               dynamic_threshold_max=1.5 if thresholding else None)
    stage = Stage(net, schedule, IdentityCodec(), stage_config=stage_config)
    settings = GenerationSettings(sampler=sampler, steps=STEPS, guidance=GUIDANCE, seed=seed, height=SHAPE[-1],
                                  width=SHAPE[-1], dynamic_threshold=dynamic_threshold)
    cond = {"cond": {"context": text["cond"]}, "uncond": {"context": text["uncond"]}}
    return sample(stage, ["a prompt"], settings, cond=cond)


@pytest.fixture
def net_and_text():
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    text = {"cond": torch.randn(1, generator=g), "uncond": torch.randn(1, generator=g)}
    return VarianceNet(int(torch.initial_seed() % 2**31)), text


@pytest.mark.parametrize("thresholding, clip_sample", [(True, True), (False, True), (False, False)])
def test_if_guided_ddpm_loop_matches_diffusers(net_and_text, thresholding, clip_sample):
    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": thresholding, "clip_sample": clip_sample}
    expected = diffusers_loop(net, config, text)
    assert_close_to_ref(ldm_sample(net, config, text), expected)
    # The three settings give different images, 100x the tolerance at least: each is really exercised.
    others = [diffusers_loop(net, {**IF_SCHEDULER, "thresholding": th, "clip_sample": cl}, text)
              for th, cl in [(True, True), (False, True), (False, False)] if (th, cl) != (thresholding, clip_sample)]
    for other in others:
        assert (other - expected).abs().max() > 1e-3 * expected.abs().max()


def test_learned_range_variance_is_used(net_and_text):
    """With fixed_small (the variance half dropped) the reference moves far beyond the tolerance."""
    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": True, "clip_sample": True}
    expected = diffusers_loop(net, config, text)
    fixed = diffusers_loop(net, {**config, "variance_type": "fixed_small"}, text)
    assert (fixed - expected).abs().max() > 1e-3 * expected.abs().max()
    assert_close_to_ref(ldm_sample(net, config, text), expected)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_a_fixed_variance_type_overrides_the_learned_half(net_and_text, variance_type):
    """IFPipeline drops the network's variance half when the scheduler's variance_type is not learned (e.g.
    `DDPMScheduler.from_config(IF's config, variance_type="fixed_small")`), and DDPM steps with beta_tilde (fixed_small)
    or beta (fixed_large). ldm used the variance half of any network with twice x's channels: an IF-I folder whose
    scheduler says fixed_small came out 0.25 of the image's norm away from IFPipeline's (10 steps, guidance 3)."""
    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": True, "clip_sample": True, "variance_type": variance_type}
    expected = diffusers_loop(net, config, text)
    assert_close_to_ref(ldm_sample(net, config, text), expected)
    for other in ("learned_range", "fixed_large" if variance_type == "fixed_small" else "fixed_small"):
        moved = diffusers_loop(net, {**config, "variance_type": other}, text)
        assert (moved - expected).abs().max() > 1e-3 * expected.abs().max()
    with pytest.raises(ConfigError, match="variance_type"):
        ScheduleConfig.from_diffusers({**config, "variance_type": "fixed_medium"})


def test_dynamic_threshold_zero_leaves_the_schedules_static_clipping(net_and_text):
    """`dynamic_threshold=0` turns dynamic thresholding off; the scheduler's `clip_sample` then clips x0 to [-1, 1],
    as diffusers' DDPMScheduler does with `thresholding: false`."""
    net, text = net_and_text
    expected = diffusers_loop(net, {**IF_SCHEDULER, "thresholding": False, "clip_sample": True}, text)
    ours = ldm_sample(net, {**IF_SCHEDULER, "thresholding": True, "clip_sample": True}, text, dynamic_threshold=0.0)
    assert_close_to_ref(ours, expected)


@pytest.mark.parametrize("thresholding", [True, False])
def test_dpm_solver_thresholds_but_never_clips_as_diffusers_does(net_and_text, thresholding):
    """IFPipeline with DPMSolverMultistepScheduler.from_config(IF's config): the learned range is dropped, x0 is
    thresholded when the config says `thresholding`, and never clipped otherwise: DPM-Solver has no `clip_sample`
    (only DDPM, DDIM and Heun read it). ldm clipped x0 for every sampler of a pixel stage whose config says
    `clip_sample`: dpmpp_2m with thresholding off was 0.93 of the image's norm away from diffusers' (IF-I, 10 steps)."""
    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": thresholding, "clip_sample": True}
    expected = diffusers_loop(net, config, text, scheduler_class="DPMSolverMultistepScheduler")
    assert_close_to_ref(ldm_sample(net, config, text, sampler="dpmpp_2m"), expected)
    if not thresholding:  # what ldm used to do: the same loop clipping x0 is far from diffusers' image
        clipped = diffusers_loop(net, {**config, "thresholding": True, "sample_max_value": 1.0}, text,
                                 scheduler_class="DPMSolverMultistepScheduler")
        assert (clipped - expected).abs().max() > 1e-3 * expected.abs().max()
    # the recorded clip follows the sampler: DDPM, DDIM and Heun clip, DPM-Solver, UniPC and Euler do not
    stage = Stage(net, ScheduleConfig.from_diffusers(config), IdentityCodec(),
                  stage_config=StageConfig(resolution=SHAPE[-1], dynamic_threshold=None))
    assert {name: stage.clip_limit(sampler=name) for name in ("ddpm", "ddim", "heun", "dpmpp_2m", "unipc", "euler")} \
        == {"ddpm": 1.0, "ddim": 1.0, "heun": 1.0, "dpmpp_2m": None, "unipc": None, "euler": None}
    assert stage.thresholding(sampler="dpmpp_2m") == ()


def test_ddpm_adds_noise_after_a_last_timestep_above_0(net_and_text):
    """"trailing" spacing ends at t = 124 (8 steps), not 0: diffusers' DDPMScheduler still adds noise after that step,
    at the learned variance between beta_124 and the floored beta_tilde = 0. ldm stopped adding noise at sigma 0:
    max|diff| 7e-3 here (tolerance 1.1e-5); on a toy IF-I at 7 steps, 0.09 of the image's norm."""
    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": True, "clip_sample": True, "timestep_spacing": "trailing"}
    assert_close_to_ref(ldm_sample(net, config, text), diffusers_loop(net, config, text))


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddim_from_the_cosine_schedules_last_timestep_keeps_float32_precision(net_and_text, spacing):
    """Both spacings start at t = 999, sigma 20291 on IF's cosine schedule. ldm's DDIM step x + (x - x0) / sigma *
    (sigma_next - sigma) cancelled 3 of float32's 7 digits there (max|diff| 1.7e-4 for linspace here, where
    diffusers' VP arithmetic keeps 1e-7); x0 + (x - x0) * sigma_next / sigma does not. (IFPipeline's DDIM:
    docs/deepfloyd-if.md.)"""
    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": True, "clip_sample": True, "timestep_spacing": spacing,
              "variance_type": "fixed_small"}  # DDIMScheduler has no variance_type: IFPipeline drops the half
    expected = diffusers_loop(net, config, text, scheduler_class="DDIMScheduler", use_clipped_model_output=True)
    assert_close_to_ref(ldm_sample(net, config, text, sampler="ddim"), expected)


def test_a_latent_models_x0_is_never_clipped_whatever_its_scheduler_says(net_and_text):
    """SD folders written by old diffusers versions can say `clip_sample: true`; diffusers' StableDiffusionPipeline
    forces it off, and a latent x0 is not an image in [-1, 1]: only a pixel stage clips."""
    net, _ = net_and_text
    schedule = ScheduleConfig.from_diffusers({**IF_SCHEDULER, "thresholding": False, "clip_sample": True})

    class LatentCodec(torch.nn.Module):  # any codec but the identity makes a latent stage
        pass

    no_dynamic = StageConfig(resolution=SHAPE[-1], dynamic_threshold=None)
    assert Stage(net, schedule, LatentCodec(), stage_config=no_dynamic).thresholding() == ()
    pixel_stage = Stage(net, schedule, IdentityCodec(), stage_config=no_dynamic)
    pixel = pixel_stage.thresholding()
    assert len(pixel) == 1 and pixel[0].keywords == {"limit": 1.0}
    # what the images' metadata records: the clip, and none where dynamic thresholding or a latent stage runs
    assert pixel_stage.clip_limit() == 1.0 and pixel_stage.clip_limit(0.95) is None
    dynamic_by_default = Stage(net, schedule, IdentityCodec(), stage_config=StageConfig(resolution=SHAPE[-1]))
    assert dynamic_by_default.clip_limit() is None and dynamic_by_default.clip_limit(0.0) == 1.0
    assert Stage(net, schedule, LatentCodec(), stage_config=no_dynamic).clip_limit() is None


def test_a_ddpm_or_ddim_config_without_clip_sample_clips_as_diffusers_does():
    """diffusers' DDPMScheduler and DDIMScheduler default to clip_sample=True; other schedulers have no such key."""
    for name in ("DDPMScheduler", "DDIMScheduler"):
        assert ScheduleConfig.from_diffusers({"_class_name": name}).clip_sample is True
        assert getattr(diffusers, name)().config.clip_sample is True
        assert ScheduleConfig.from_diffusers({"_class_name": name, "clip_sample": False}).clip_sample is False
    assert ScheduleConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler"}).clip_sample is False


def test_a_cap_kept_with_thresholding_off_applies_when_thresholding_is_turned_on(net_and_text):
    """An IF scheduler config with `thresholding: false` still says `sample_max_value: 1.5`. Turned on later (ldm:
    `--dynamic-threshold 0.95`; diffusers: DDPMScheduler with thresholding=True over the same config) s is capped at
    1.5. ldm's loader dropped the cap with thresholding off, so s ran uncapped: max|diff| 0.57-0.63 of the
    reference's magnitude (three seeds; tolerance 1e-5)."""
    from ldm.io.if_format import stage_config

    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": False, "clip_sample": True}
    loaded = stage_config(SimpleNamespace(aug_level_conditioning=False, sample_size=SHAPE[-1]), config)
    assert (loaded.dynamic_threshold, loaded.dynamic_threshold_max) == (None, 1.5)
    stage = Stage(net, ScheduleConfig.from_diffusers(config), IdentityCodec(), stage_config=loaded)
    assert stage.threshold_cap() is None and stage.threshold_cap(0.95) == 1.5  # what the metadata records
    settings = GenerationSettings(sampler="ddpm", steps=STEPS, guidance=GUIDANCE, seed=0, height=SHAPE[-1],
                                  width=SHAPE[-1], dynamic_threshold=0.95)
    cond = {"cond": {"context": text["cond"]}, "uncond": {"context": text["uncond"]}}
    expected = diffusers_loop(net, {**config, "thresholding": True}, text)
    assert_close_to_ref(sample(stage, ["a prompt"], settings, cond=cond), expected)
    uncapped = diffusers_loop(net, {**config, "thresholding": True, "sample_max_value": 1e9}, text)
    assert (uncapped - expected).abs().max() > 1e-3 * expected.abs().max()  # the cap is really exercised
    # diffusers' own default where the config has no sample_max_value
    bare = {k: v for k, v in config.items() if k != "sample_max_value"}
    assert stage_config(SimpleNamespace(aug_level_conditioning=False, sample_size=8), bare).dynamic_threshold_max == \
        diffusers.DDPMScheduler.from_config(bare).config.sample_max_value == 1.0


class PositiveVarianceNet(VarianceNet):
    """VarianceNet whose variance half is a variance (in (0, 0.2)), as diffusers' variance_type "learned" reads it."""

    def forward(self, x, t, context=None):
        out = super().forward(x, t, context)
        return torch.cat([out[:, :3], 0.1 * (out[:, 3:] + 1)], dim=1)


def test_learned_variance_type_is_the_variance_itself_as_diffusers_reads_it(net_and_text):
    """diffusers' DDPMScheduler with variance_type "learned" adds sqrt(v) * noise: the network's half is x_prev's
    (VP) variance itself, not learned_range's interpolation of log variances. ldm read "learned" as "learned_range":
    max|diff| 0.93-1.31 of the reference's magnitude (three seeds; tolerance 1e-5). A negative half (diffusers: NaN)
    is refused."""
    net, text = net_and_text
    net = PositiveVarianceNet(int(torch.initial_seed() % 2**31))
    config = {**IF_SCHEDULER, "thresholding": True, "clip_sample": True, "variance_type": "learned"}
    expected = diffusers_loop(net, config, text)
    assert_close_to_ref(ldm_sample(net, config, text), expected)
    as_range = diffusers_loop(net, {**config, "variance_type": "learned_range"}, text)
    assert (as_range - expected).abs().max() > 1e-3 * expected.abs().max()
    # "trailing" ends at t = 124: the last step adds noise too, at the network's variance
    trailing = {**config, "timestep_spacing": "trailing"}
    assert_close_to_ref(ldm_sample(net, trailing, text), diffusers_loop(net, trailing, text))
    # VarianceNet's half lies in [-1, 1]: diffusers' image is NaN, ldm says why
    assert diffusers_loop(VarianceNet(0), config, text).isnan().any()
    with pytest.raises(LdmError, match="variance_type 'learned' takes it as the variance itself"):
        ldm_sample(VarianceNet(0), config, text)


def test_the_log_fixed_variance_types(net_and_text):
    """fixed_small_log is fixed_small in diffusers (exp(0.5 log beta_tilde) as the std). fixed_large_log (GLIDE's
    max_log: log variance log beta) makes NaN in diffusers' DDPMScheduler, whose step takes the square root of
    log beta < 0; ldm samples it as its name says, with variance beta: fixed_large's image."""
    net, text = net_and_text
    config = {**IF_SCHEDULER, "thresholding": True, "clip_sample": True}
    small_log = {**config, "variance_type": "fixed_small_log"}
    assert_close_to_ref(ldm_sample(net, small_log, text), diffusers_loop(net, small_log, text))
    large_log = {**config, "variance_type": "fixed_large_log"}
    assert diffusers_loop(net, large_log, text).isnan().all()
    ours = ldm_sample(net, large_log, text)
    assert_close_to_ref(ours, diffusers_loop(net, {**config, "variance_type": "fixed_large"}, text))


def test_training_refuses_a_learned_variance_type():
    """The hybrid loss trains learned_range's interpolation; a schedule saying "learned" would sample it otherwise."""
    from ldm.train.model import DiffusionObjective

    parts = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(learn_sigma=True)),
                            schedule=ScheduleConfig.from_diffusers({**IF_SCHEDULER, "variance_type": "learned"}))
    with pytest.raises(ConfigError, match="set it to learned_range"):
        DiffusionObjective(parts, None)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"])
def test_training_refuses_a_learned_variance_under_a_fixed_variance_type(variance_type):
    """A fixed variance_type samples without the variance half the hybrid loss would train: refused, naming both
    ways out (the hybrid loss failed with a bare ValueError under fixed_small and trained an unused half else)."""
    from ldm.train.model import DiffusionObjective

    parts = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(learn_sigma=True)),
                            schedule=ScheduleConfig.from_diffusers({**IF_SCHEDULER, "variance_type": variance_type}))
    with pytest.raises(ConfigError, match=f"variance_type={variance_type}.*learned_range.*learn_sigma=false"):
        DiffusionObjective(parts, None)
