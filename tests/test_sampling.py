"""Schedules, respacing and sampler trajectories against the reference GaussianDiffusion."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adm_cli.config import ClassifierConfig, UNetConfig
from adm_cli.denoiser import Denoiser
from adm_cli.errors import RespacingError
from adm_cli.guidance import classifier_guidance
from adm_cli.models import build_model
from adm_cli.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from adm_cli.schedule import Schedule, beta_schedule, space_timesteps
from conftest import randomize
from reference import gd, reference_classifier, reference_diffusion, reference_unet, space_timesteps as ref_space


@pytest.mark.parametrize("spec", ["250", "ddim25", "ddim50", "25,25", "10,15,20", "1000", "", "ddim1000", "7",
                                  "0,10", "10,0", "0,3,0"])
def test_respacing_matches_reference(spec):
    assert space_timesteps(1000, spec) == sorted(ref_space(1000, spec or [1000]))


@pytest.mark.parametrize("spec", ["ddim300", "ddimx", "2000", "abc", "0", "300,300,300,300", " ", "0,0", "-1,5"])
def test_bad_respacing_raises(spec):
    with pytest.raises(RespacingError):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["", "ddim25", "10,15,20"])
def test_schedule_tables_match_reference(name, spec):
    cfg = UNetConfig(image_size=32, num_channels=32, channel_mult="1,2", noise_schedule=name, learn_sigma=True)
    ref = reference_diffusion(cfg, spec)
    ours = Schedule.create(name, 1000, spec)
    np.testing.assert_allclose(beta_schedule(name, 1000), gd.get_named_beta_schedule(name, 1000), rtol=0, atol=0)
    np.testing.assert_allclose(ours.betas, ref.betas, rtol=1e-12)
    tab = ours.numpy_tables()
    np.testing.assert_allclose(tab["alpha_bar"], ref.alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(tab["coef_x0"], ref.posterior_mean_coef1, rtol=1e-12)
    np.testing.assert_allclose(tab["coef_xt"], ref.posterior_mean_coef2, rtol=1e-12)
    np.testing.assert_allclose(tab["log_var_small"], ref.posterior_log_variance_clipped, rtol=1e-12)
    assert list(ours.timesteps) == ref.timestep_map


class _Replay:
    """Feeds one fixed list of noise tensors, in order, to whoever asks."""

    def __init__(self, tensors):
        self.tensors, self.calls = list(tensors), 0

    def __call__(self, like):
        out = self.tensors[self.calls]
        self.calls += 1
        return out.clone()


def _tiny(schedule: str, class_cond: bool, learn_sigma: bool = True):
    cfg = UNetConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                     num_head_channels=32, learn_sigma=learn_sigma, class_cond=class_cond, noise_schedule=schedule,
                     resblock_updown=True, num_classes=10)
    ref = randomize(reference_unet(cfg), seed=3, std=0.02)
    ours = build_model(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    ccfg = ClassifierConfig(image_size=16, classifier_width=32, classifier_depth=1, channel_mult="1,2",
                            classifier_attention_resolutions="8", num_head_channels=32, num_classes=10)
    rclf = randomize(reference_classifier(ccfg), seed=4)
    oclf = build_model(ccfg).eval()
    oclf.load_state_dict(rclf.state_dict())
    return cfg, ref, ours, rclf, oclf


CASES = [("ddpm", 0.0, "25"), ("ddim", 0.0, "ddim10"), ("ddim", 0.5, "ddim10")]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("class_cond", [True, False], ids=["cond", "uncond"])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("sampler,eta,spec", CASES, ids=[f"{s}-eta{e}" for s, e, _ in CASES])
def test_trajectory_matches_reference(schedule, class_cond, guided, sampler, eta, spec, monkeypatch):
    cfg, ref, ours, rclf, oclf = _tiny(schedule, class_cond)
    n, shape = 3, (3, 3, 16, 16)
    g = torch.Generator().manual_seed(11)
    x_t = torch.randn(shape, generator=g)
    steps = len(space_timesteps(1000, spec))
    noises = [torch.randn(shape, generator=g) for _ in range(steps)]
    y = torch.tensor([1, 4, 9])
    scale = 3.0

    # Reference: its loop draws torch.randn_like once per step; replay our list there.
    diffusion = reference_diffusion(cfg, spec)

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = F.log_softmax(rclf(x_in, t), dim=-1)[torch.arange(len(x)), y]
            return torch.autograd.grad(lp.sum(), x_in)[0] * scale

    monkeypatch.setattr(torch, "randn_like", _Replay(noises))
    kwargs = {"y": y} if class_cond else {}
    if not class_cond and guided:
        kwargs = {"y": y}
        model_fn = lambda x, t, y=None: ref(x, t)  # noqa: E731 - unconditional model, label for the classifier
    else:
        model_fn = ref
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    extra = {} if sampler == "ddpm" else {"eta": eta}
    with torch.no_grad():
        expected = loop(model_fn, shape, noise=x_t.clone(), clip_denoised=True, model_kwargs=kwargs,
                        cond_fn=cond_fn if guided else None, progress=False, device=torch.device("cpu"), **extra)
    monkeypatch.undo()

    sched = Schedule.create(schedule, 1000, spec)
    fn = Denoiser(ours, sched, y=y if class_cond else None)
    if guided:
        fn = classifier_guidance(fn, oclf, sched, y, scale)
    replay = _Replay(noises)
    run = sample_ddpm if sampler == "ddpm" else sample_ddim
    with torch.no_grad():
        got = run(fn, x_t.clone(), sched, noise=replay, eta=eta)
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max() > 0.1  # a real trajectory, not a collapsed one
    stochastic = steps - 1 if (sampler == "ddpm" or eta > 0) else 0
    assert replay.calls == stochastic


def test_guidance_changes_the_trajectory():
    cfg, _, ours, _, oclf = _tiny("linear", True)
    sched = Schedule.create("linear", 1000, "ddim5")
    y = torch.tensor([2, 2])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    zero = lambda like: torch.zeros_like(like)  # noqa: E731
    plain = sample_ddim(Denoiser(ours, sched, y=y), x, sched, noise=zero)
    guided = sample_ddim(classifier_guidance(Denoiser(ours, sched, y=y), oclf, sched, y, 10.0), x, sched, noise=zero)
    assert (plain - guided).abs().max() > 1e-3


@pytest.mark.parametrize("schedule,guided,spec", [("linear", False, "ddim10"), ("linear", True, "ddim10"),
                                                  ("cosine", False, "ddim10"), ("cosine", True, "ddim10"),
                                                  ("linear", True, "10")])
def test_dpmpp_2m_matches_diffusers(schedule, guided, spec):
    """DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (the solver authors'
    implementation there), stepping with the reference's x0: clipped, then guided as the
    reference's DDIM guides it (condition_score). Only the solver's update is ours vs theirs."""
    from diffusers import DPMSolverMultistepScheduler

    cfg, ref, ours, rclf, oclf = _tiny(schedule, True)
    shape = (3, 3, 16, 16)
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    y = torch.tensor([1, 4, 9])
    scale = 3.0

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = F.log_softmax(rclf(x_in, t), dim=-1)[torch.arange(len(x)), y]
            return torch.autograd.grad(lp.sum(), x_in)[0] * scale

    diffusion = reference_diffusion(cfg, spec)
    solver = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=gd.get_named_beta_schedule(schedule, 1000), solver_order=2,
        prediction_type="sample", algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero")
    timesteps = space_timesteps(1000, spec)
    solver.set_timesteps(timesteps=timesteps[::-1])
    x = x_t.clone()
    with torch.no_grad():
        for k, t in enumerate(solver.timesteps):
            i = torch.full((len(x),), len(timesteps) - 1 - k)  # the respaced index the reference takes
            out = diffusion.p_mean_variance(ref, x, i, clip_denoised=True, model_kwargs={"y": y})
            if guided:
                out = diffusion.condition_score(cond_fn, out, x, i, model_kwargs={"y": y})
            x = solver.step(out["pred_xstart"], t, x).prev_sample
    expected = x

    sched = Schedule.create(schedule, 1000, spec)
    fn = Denoiser(ours, sched, y=y)
    if guided:
        fn = classifier_guidance(fn, oclf, sched, y, scale)
    never = lambda like: pytest.fail("DPM-Solver++(2M) is deterministic: no noise")  # noqa: E731
    with torch.no_grad():
        got = sample_dpmpp_2m(fn, x_t.clone(), sched, noise=never)
        ddim = sample_ddim(fn, x_t.clone(), sched, noise=never)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - ddim).abs().max().item() > 0.05  # the second-order term is there


def test_dpmpp_2m_first_step_and_last_are_ddim_steps():
    """Two steps: the first has no previous x0 (first order) and the last lands on alpha_bar = 1
    (first order too), so DPM-Solver++(2M) must equal DDIM (eta 0) exactly there."""
    cfg, _, ours, _, _ = _tiny("linear", True)
    sched = Schedule.create("linear", 1000, "2")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    fn = Denoiser(ours, sched, y=torch.tensor([0, 3]))
    with torch.no_grad():
        a = sample_dpmpp_2m(fn, x, sched, noise=None)
        b = sample_ddim(fn, x, sched, noise=None)
    assert (a - b).abs().max().item() <= 1e-5  # the two formulas round differently


def _fixed_variance_models(schedule: str):
    return _tiny(schedule, True, learn_sigma=False)[:3]


def _run_both(cfg, ref, ours, sampler, spec, *, sigma_small=False, eta=0.0, guided=None, monkeypatch):
    """(reference, ours) for one run with the same x_T and step noise; ``guided``: (classifier
    pair, scale)."""
    shape = (3, 3, 16, 16)
    g = torch.Generator().manual_seed(11)
    x_t = torch.randn(shape, generator=g)
    noises = [torch.randn(shape, generator=g) for _ in range(len(space_timesteps(1000, spec)))]
    y = torch.tensor([1, 4, 9])
    cond_fn = None
    if guided is not None:
        (rclf, oclf), scale = guided

        def cond_fn(x, t, y=None):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                lp = F.log_softmax(rclf(x_in, t), dim=-1)[torch.arange(len(x)), y]
                return torch.autograd.grad(lp.sum(), x_in)[0] * scale
    diffusion = reference_diffusion(cfg, spec, sigma_small=sigma_small)
    monkeypatch.setattr(torch, "randn_like", _Replay(noises))
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    with torch.no_grad():
        expected = loop(ref, shape, noise=x_t.clone(), clip_denoised=True, model_kwargs={"y": y}, cond_fn=cond_fn,
                        progress=False, device=torch.device("cpu"), **({} if sampler == "ddpm" else {"eta": eta}))
    monkeypatch.undo()
    sched = Schedule.create(cfg.noise_schedule, 1000, spec)
    fn = Denoiser(ours, sched, y=y)
    if guided is not None:
        fn = classifier_guidance(fn, guided[0][1], sched, y, guided[1])
    run = sample_ddpm if sampler == "ddpm" else sample_ddim
    with torch.no_grad():
        got = run(fn, x_t.clone(), sched, noise=_Replay(noises), eta=eta, variance="small" if sigma_small else "large")
    return expected, got


@pytest.mark.parametrize("sigma_small", [True, False], ids=["fixed-small", "fixed-large"])
def test_guided_ddpm_with_fixed_variance_matches_reference(sigma_small, monkeypatch):
    """The guidance shift Sigma g uses beta~_t unclipped for fixed-small (0 on the last step); a
    large scale makes any other choice visible (1.5e-4 at scale 100 with the clipped one)."""
    cfg, ref, ours = _fixed_variance_models("linear")
    _, _, _, rclf, oclf = _tiny("linear", True)
    expected, got = _run_both(cfg, ref, ours, "ddpm", "10", sigma_small=sigma_small, guided=((rclf, oclf), 100.0),
                              monkeypatch=monkeypatch)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 2e-5


def test_ddim_eta_one_never_takes_the_root_of_a_negative(monkeypatch):
    """At eta = 1, 1 - alpha_bar' - sigma^2 is 0 up to rounding; on cosine "3" float32 makes it
    negative and the reference's images NaN (black). Ours clamps it and stays next to eta just
    below 1, which the reference computes."""
    cfg, ref, ours = _fixed_variance_models("cosine")
    expected, got = _run_both(cfg, ref, ours, "ddim", "3", eta=1.0, monkeypatch=monkeypatch)
    assert torch.isnan(expected).any()  # the reference's float32 formula
    assert torch.isfinite(got).all()
    near, _ = _run_both(cfg, ref, ours, "ddim", "3", eta=1.0 - 1e-6, monkeypatch=monkeypatch)
    # sqrt(1 - alpha_bar' - sigma^2) is ~1e-3 there instead of 0: about one uint8 level (2 / 255)
    assert torch.isfinite(near).all() and (got - near).abs().max().item() <= 2 / 255


@pytest.mark.parametrize("case", [
    dict(sampler="ddpm", spec="25", clip=False, guided=3.0),
    dict(sampler="ddim", spec="ddim10", clip=False, guided=3.0, eta=0.5),
    dict(sampler="ddpm", spec="3,4,5", n=5, guided=2.0),
    dict(sampler="ddim", spec="5,5", n=1),
    dict(sampler="ddpm", spec="8", upsampler=True, clip=False),
], ids=["ddpm-unclipped-guided", "ddim-unclipped-guided", "ddpm-sections-batch5", "ddim-sections-batch1",
        "upsampler-unclipped"])
def test_every_step_matches_reference(case, monkeypatch):
    """The whole trajectory, step by step (the reference's progressive loops), where the tests
    above look at the end only: unclipped x0, sectioned respacings, odd batches, an upsampler's
    low-resolution input."""
    from adm_cli.config import get_preset

    sampler, spec, n = case["sampler"], case["spec"], case.get("n", 3)
    clip, scale, eta = case.get("clip", True), case.get("guided", 0.0), case.get("eta", 0.0)
    if case.get("upsampler"):
        cfg = get_preset("64_256_upsampler").replace(
            num_channels=32, num_res_blocks=1, image_size=16, small_size=8, channel_mult="1,2",
            attention_resolutions="8", num_classes=10)
        ref = randomize(reference_unet(cfg), seed=3, std=0.02)
        ours = build_model(cfg).eval()
        ours.load_state_dict(ref.state_dict())
        rclf = oclf = None
    else:
        cfg, ref, ours, rclf, oclf = _tiny("linear", True)
    g = torch.Generator().manual_seed(11)
    shape = (n, 3, 16, 16)
    x_t = torch.randn(shape, generator=g)
    noises = [torch.randn(shape, generator=g) for _ in range(len(space_timesteps(1000, spec)))]
    y = torch.randint(0, 10, (n,), generator=g)
    low = torch.randn(n, 3, 8, 8, generator=g).clamp(-1, 1) if case.get("upsampler") else None

    def cond_fn(x, t, y=None, **kwargs):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = F.log_softmax(rclf(x_in, t), dim=-1)[torch.arange(len(x)), y]
            return torch.autograd.grad(lp.sum(), x_in)[0] * scale

    kwargs = {"y": y, **({"low_res": low} if low is not None else {})}
    diffusion = reference_diffusion(cfg, spec)
    loop = diffusion.p_sample_loop_progressive if sampler == "ddpm" else diffusion.ddim_sample_loop_progressive
    monkeypatch.setattr(torch, "randn_like", _Replay(noises))
    with torch.no_grad():
        expected = [o["sample"] for o in loop(ref, shape, noise=x_t.clone(), clip_denoised=clip, model_kwargs=kwargs,
                                              cond_fn=cond_fn if scale else None, progress=False,
                                              device=torch.device("cpu"), **({} if sampler == "ddpm" else {"eta": eta}))]
    monkeypatch.undo()

    sched = Schedule.create(cfg.noise_schedule, 1000, spec)
    fn = Denoiser(ours, sched, y=y, low_res=low)
    if scale:
        fn = classifier_guidance(fn, oclf, sched, y, scale)
    got = []
    run = sample_ddpm if sampler == "ddpm" else sample_ddim
    with torch.no_grad():
        run(fn, x_t.clone(), sched, noise=_Replay(noises), eta=eta, clip_x0=clip,
            callback=lambda i, x: got.append(x.clone()))
    assert len(got) == len(expected)
    worst = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(expected, got))
    assert worst <= 3e-5, worst  # float32 rounding: the audit saw up to 1.2e-5 over such runs
    assert expected[-1].abs().max() > 0.1


def test_the_torch_free_sampler_names_are_the_samplers():
    """settings.SAMPLER_NAMES (checked before torch is imported) and samplers.SAMPLERS (what
    runs) name the same samplers, and every one has a default step count."""
    from adm_cli.samplers import SAMPLERS
    from adm_cli.settings import DEFAULT_STEPS, SAMPLER_NAMES

    assert tuple(SAMPLERS) == SAMPLER_NAMES == tuple(DEFAULT_STEPS)
