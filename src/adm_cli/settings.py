"""How to sample, as plain data: the sampler, its steps or respacing, eta and the guidance scale.
Torch-free, so that `adm sample` refuses a bad value before it imports torch (~3 s)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import RespacingError, UsageError
from .respacing import space_timesteps

SAMPLER_NAMES = ("ddpm", "ddim", "dpm++2m")  # samplers.SAMPLERS' keys, in this order
DEFAULT_STEPS = {"ddpm": 250, "ddim": 25, "dpm++2m": 20}
"""Steps when none are given: the paper's 250 for DDPM, its 25 for DDIM, and 20 for
DPM-Solver++(2M) (Lu et al.: high-quality guided samples in 15 to 20 steps)."""


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample. ``respacing`` is the reference's string ("250", "ddim25", "10,15,20");
    ``steps`` is the shorthand the paper's scripts use: "N" for DDPM, "ddimN" for DDIM; DPM-Solver++
    takes "N" too: N model calls at timesteps evenly spaced from T - 1 down to 0, the first one on
    pure noise (where "ddimN" starts at (N - 1) T / N), then the first-order step from t = 0 onto
    the clean image; that is DPM-Solver's N - 1 time-uniform steps followed by its
    ``denoise_to_zero`` call. None: ``DEFAULT_STEPS``."""

    sampler: str = "ddpm"
    steps: int | None = None
    respacing: str | None = None
    eta: float = 0.0
    guidance: float = 0.0
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLER_NAMES:
            raise UsageError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLER_NAMES)})")
        if self.steps is not None and self.steps < 2:  # one step: the network alone on pure noise
            raise UsageError(f"--steps must be at least 2, got {self.steps}")
        # NaN passes every comparison below and gives black images (and NaN, not JSON, in run.json)
        for flag, value in (("--eta", self.eta), ("--guidance", self.guidance)):
            if not math.isfinite(value):
                raise UsageError(f"{flag} must be a finite number, got {value}")
        if not 0 <= self.eta <= 1:
            # DDIM's sigma_t = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a'): beyond eta = 1 the
            # direction term's 1 - a' - sigma^2 goes negative (the reference gives NaN there)
            raise UsageError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {self.eta}")
        if self.eta > 0 and self.sampler == "dpm++2m":
            raise UsageError("--eta is DDIM's stochasticity; dpm++2m is deterministic (leave --eta at 0)")
        if self.eta > 0 and self.sampler == "ddpm":  # it would be ignored, yet recorded
            raise UsageError("--eta is DDIM's stochasticity; ddpm ignores it (use --sampler ddim, or leave --eta at 0)")
        if self.guidance < 0:
            raise UsageError(f"--guidance must be >= 0, got {self.guidance}")

    def respacing_for(self, diffusion_steps: int) -> str:
        if self.respacing is not None:  # ("" is a choice too: every one of the T steps)
            spec = self.respacing
        else:
            steps = self.steps or DEFAULT_STEPS[self.sampler]
            spec = f"ddim{steps}" if self.sampler == "ddim" else str(steps)
        try:
            space_timesteps(diffusion_steps, spec)  # validates (RespacingError names the problem)
        except RespacingError as exc:
            if self.respacing is not None or "no integer stride" not in str(exc):
                raise
            if steps > diffusion_steps:  # no spacing takes more steps than the model was trained with
                raise RespacingError(f"--steps {steps}: the model has {diffusion_steps} diffusion steps; "
                                     f"give at most --steps {diffusion_steps}") from None
            # the user typed --steps N, not "ddimN": say what DDIM's spacing is and the way out
            raise RespacingError(f"--steps {steps}: DDIM takes every k-th of the {diffusion_steps} steps and no "
                                 f"integer k gives exactly {steps}; --respacing {steps} spreads {steps} steps "
                                 "evenly instead") from None
        return spec

    def to_dict(self) -> dict:
        return asdict(self)
