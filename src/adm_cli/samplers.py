"""Samplers: short functions over (model function, x_T, schedule).

Notation (per step i of the schedule, t = S_i): alpha_bar = alpha_bar_t, x0 the predicted clean
image, eps the predicted noise, g the guidance gradient carried by the prediction (guidance.py).
Every sampler has the same keyword-only signature; noise enters only through ``noise(x)``
(noise.py), drawn once per stochastic step in step order. ``callback(i, x)`` is called after
each step. Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Callable

import torch

from .denoiser import ModelFn, Prediction
from .guidance import correct_eps, shift_mean
from .noise import NoiseFn
from .schedule import Schedule

Callback = Callable[[int, torch.Tensor], None] | None


def _x0_from_eps(tab: dict, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(1 / alpha_bar) x_t - sqrt(1 / alpha_bar - 1) eps  (Ho et al. eq. 15)."""
    return tab["sqrt_recip_ab"][i] * x - tab["sqrt_recipm1_ab"][i] * eps


def _eps_from_x0(tab: dict, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return (tab["sqrt_recip_ab"][i] * x - x0) / tab["sqrt_recipm1_ab"][i]


def _variance(tab: dict, i: int, pred: Prediction, variance: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log Sigma_t, Sigma_t): learned interpolation v, or the fixed small / large choice.
    Sigma_t is what guidance shifts the mean by: for fixed-small that is beta~_t unclipped (0 at
    t = 0, where its log is clipped), as in the reference."""
    if pred.v is not None and variance == "learned":
        frac = (pred.v + 1) / 2  # Nichol & Dhariwal eq. 15
        log_var = frac * tab["log_beta"][i] + (1 - frac) * tab["log_var_small"][i]
        return log_var, None if pred.grad is None else torch.exp(log_var)  # (a full-size exp: only if used)
    if variance == "large":
        return tab["log_var_large"][i], torch.exp(tab["log_var_large"][i])
    return tab["log_var_small"][i], tab["var_small"][i]


def _guided_x0(tab: dict, i: int, x: torch.Tensor, pred: Prediction, clip_x0: bool) -> torch.Tensor:
    """The x0 an eps-based solver steps with: predicted, clipped, then moved by classifier
    guidance through eps (Algorithm 2) as the reference's DDIM does (not clipped again)."""
    x0 = _x0_from_eps(tab, i, x, pred.eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    if pred.grad is not None:
        eps = correct_eps(_eps_from_x0(tab, i, x, x0), tab["alpha_bar"][i], pred.grad)
        x0 = _x0_from_eps(tab, i, x, eps)
    return x0


def sample_ddpm(model_fn: ModelFn, x: torch.Tensor, schedule: Schedule, *, noise: NoiseFn,
                clip_x0: bool = True, variance: str = "learned", eta: float = 1.0,
                callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling from p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

    mu = coef_x0 x0 + coef_xt x_t (the posterior mean with the predicted x0), shifted by Sigma g
    under classifier guidance (Dhariwal & Nichol, Algorithm 1). ``variance``: 'learned' (needs v),
    'small' (beta~_t) or 'large' (beta_t). ``eta`` is unused (DDPM is fully stochastic).
    """
    tab = schedule.tables(x.device)
    for i in reversed(range(len(schedule))):
        pred = model_fn(x, i)
        x0 = _x0_from_eps(tab, i, x, pred.eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean = tab["coef_x0"][i] * x0 + tab["coef_xt"][i] * x
        log_var, var = _variance(tab, i, pred, variance)
        mean = shift_mean(mean, var, pred.grad)
        x = mean + torch.exp(0.5 * log_var) * noise(x) if i > 0 else mean
        if callback is not None:
            callback(i, x)
    return x


def sample_ddim(model_fn: ModelFn, x: torch.Tensor, schedule: Schedule, *, noise: NoiseFn,
                clip_x0: bool = True, variance: str = "learned", eta: float = 0.0,
                callback: Callback = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity eta.

    x_{t-1} = sqrt(alpha_bar') x0 + sqrt(1 - alpha_bar' - sigma^2) eps + sigma z, where
    sigma = eta sqrt((1 - alpha_bar') / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar').
    eps is re-derived from the clipped x0, then corrected by guidance (Algorithm 2) and x0
    recomputed from it, as the reference does. ``variance`` is unused.
    """
    tab = schedule.tables(x.device)
    for i in reversed(range(len(schedule))):
        x0 = _guided_x0(tab, i, x, model_fn(x, i), clip_x0)
        eps = _eps_from_x0(tab, i, x, x0)
        ab, ab_prev = tab["alpha_bar"][i], tab["alpha_bar_prev"][i]
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        # (1 - alpha_bar' - sigma^2 is 0 at eta = 1 up to float32 rounding, which can make it
        # slightly negative: clamped, or its square root is NaN and the image black.)
        x = x0 * torch.sqrt(ab_prev) + torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0)) * eps
        if eta > 0 and i > 0:
            x = x + sigma * noise(x)
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, schedule: Schedule, *, noise: NoiseFn,
                    clip_x0: bool = True, variance: str = "learned", eta: float = 0.0,
                    callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the probability-flow ODE in the data
    prediction, second order from the previous step's x0, one network call per step.

    x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (e^{-h} - 1) D with D = x0_i + r_i (x0_i -
    x0_{i+1}) (schedule.py's ``dpm_*`` tables). The first step and the last (onto alpha_bar = 1)
    are first order, i.e. DDIM steps; x0 is clipped and guided as in DDIM. Deterministic:
    ``noise`` is never called; ``variance`` and ``eta`` are unused.
    """
    tab = schedule.tables(x.device)
    x0_prev = None
    for i in reversed(range(len(schedule))):
        x0 = _guided_x0(tab, i, x, model_fn(x, i), clip_x0)
        d = x0 if x0_prev is None else x0 + tab["dpm_r"][i] * (x0 - x0_prev)
        x = tab["dpm_sigma_ratio"][i] * x + tab["dpm_coef"][i] * d
        x0_prev = x0
        if callback is not None:
            callback(i, x)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++2m": sample_dpmpp_2m}
