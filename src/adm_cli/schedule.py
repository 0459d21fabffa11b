"""The Gaussian diffusion schedule as explicit data (Ho et al. 2020; Nichol & Dhariwal 2021).

Notation: beta_t the forward variances, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.
A respaced schedule keeps a subset S of the T training steps (``timesteps``, ascending) and
recomputes beta_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}} so that alpha_bar is unchanged on S
(Nichol & Dhariwal 2021, section 4). Samplers index it by i = 0 .. len-1; ``timesteps[i]`` is
the original t the networks were trained with. All tables are computed in float64, as the
reference does, and cast to float32 once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import RespacingError
from .respacing import space_timesteps


def beta_schedule(name: str, steps: int) -> np.ndarray:
    """beta_1..beta_T of the 'linear' (DDPM, scaled to T) or 'cosine' (improved DDPM) schedule."""
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if name == "cosine":
        # alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2), s = 0.008; beta clipped at 0.999.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
            dtype=np.float64,
        )
    raise RespacingError(f"unknown noise schedule {name!r} (expected 'linear' or 'cosine')")


@dataclass(frozen=True)
class Schedule:
    """A (possibly respaced) schedule: float64 tables over i = 0 .. len-1."""

    timesteps: tuple[int, ...]
    betas: np.ndarray
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def create(cls, name: str = "linear", steps: int = 1000, respacing: str | int = "") -> "Schedule":
        base = beta_schedule(name, steps)
        keep = space_timesteps(steps, respacing)
        alpha_bar = np.cumprod(1.0 - base)
        betas, last = [], 1.0
        for t in keep:
            betas.append(1 - alpha_bar[t] / last)
            last = alpha_bar[t]
        return cls(tuple(keep), np.array(betas, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.timesteps)

    # float64 tables ------------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    def numpy_tables(self) -> dict[str, np.ndarray]:
        b, ab, ab_prev = self.betas, self.alphas_cumprod, self.alphas_cumprod_prev
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)  # beta~_t, variance of q(x_{t-1} | x_t, x_0)
        # log beta~_0 is -inf (beta~_0 = 0): the reference clips it to log beta~_1.
        post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b)
        return {
            "alpha_bar": ab,
            "alpha_bar_prev": ab_prev,
            "sqrt_recip_ab": np.sqrt(1.0 / ab),
            "sqrt_recipm1_ab": np.sqrt(1.0 / ab - 1),
            "coef_x0": b * np.sqrt(ab_prev) / (1.0 - ab),  # posterior mean: coef_x0 x0 + coef_xt x_t
            "coef_xt": (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab),
            "log_var_small": post_logvar,  # fixed small: beta~_t (clipped at t = 0)
            "var_small": post_var,  # beta~_t itself (0 at t = 0): what guidance shifts the mean by
            "log_var_large": np.log(np.append(post_var[1], b[1:])) if len(b) > 1 else np.log(b),
            "log_beta": np.log(b),
            **_dpm_solver_tables(ab, ab_prev),
        }

    def tables(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The tables as float32 tensors on ``device`` (cached), indexed by step i."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = {
                k: torch.from_numpy(v).to(device=device, dtype=torch.float32) for k, v in self.numpy_tables().items()
            }
            self._tables[key]["t"] = torch.tensor(self.timesteps, dtype=torch.long, device=device)
        return self._tables[key]


def _dpm_solver_tables(ab: np.ndarray, ab_prev: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++ coefficients (Lu et al. 2022) for the step from S_i to S_{i-1}.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t /
    sigma_t) and h_i = lambda_{i-1} - lambda_i, the first-order update in the data prediction
    D is x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (e^{-h_i} - 1) D (with D = x0 this
    is DDIM, eta = 0). The second-order multistep D = x0_i + (x0_i - x0_{i+1}) h_i / (2 h_{i+1})
    uses the previous step's prediction: ``dpm_r`` is that h_i / (2 h_{i+1}), 0 where no previous
    step exists (i = len - 1) and on the last step (i = 0: alpha_bar' = 1, h = inf, and the
    first-order update returns D itself).
    """
    with np.errstate(divide="ignore"):
        lam = 0.5 * (np.log(ab) - np.log1p(-ab))
        lam_prev = 0.5 * (np.log(ab_prev) - np.log1p(-ab_prev))  # +inf where alpha_bar' = 1
    h = lam_prev - lam
    r = np.zeros_like(h)
    r[1:-1] = h[1:-1] / (2 * h[2:])
    return {
        "dpm_sigma_ratio": np.sqrt((1.0 - ab_prev) / (1.0 - ab)),
        "dpm_coef": -np.sqrt(ab_prev) * np.expm1(-h),
        "dpm_r": r,
    }
