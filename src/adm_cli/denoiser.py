"""The one adapter that hides ADM's quirks from the samplers.

It maps a respaced step index i to the original timestep t = S_i the network was trained on,
feeds the class label (and the low-resolution image of an upsampler), and splits a
learned-sigma output [eps, v] into eps and v (Nichol & Dhariwal 2021, eq. 15: the log-variance
interpolates between log beta~_t and log beta_t with weight (v + 1) / 2). Samplers only see
``Prediction``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from .schedule import Schedule


@dataclass(frozen=True)
class Prediction:
    """What a model function returns at step i.

    eps: predicted noise. v: the learned variance weight in [-1, 1] (None: fixed variance).
    grad: s * grad_x log p(y | x_t), set by a guidance wrapper (None: unguided).
    """

    eps: torch.Tensor
    v: torch.Tensor | None = None
    grad: torch.Tensor | None = None

    def with_grad(self, grad: torch.Tensor) -> "Prediction":
        return replace(self, grad=grad)


class ModelFn(Protocol):
    def __call__(self, x: torch.Tensor, i: int) -> Prediction: ...


class Denoiser:
    """Wrap an ADM U-Net as a ``ModelFn`` over a schedule's step indices."""

    def __init__(self, model: torch.nn.Module, schedule: Schedule, *, y: torch.Tensor | None = None,
                 low_res: torch.Tensor | None = None, learn_sigma: bool | None = None):
        self.model, self.schedule = model, schedule
        self.y, self.low_res = y, low_res
        cfg = getattr(model, "config", None)
        self.learn_sigma = cfg.learn_sigma if learn_sigma is None else learn_sigma

    def timestep(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The original timestep of step i, one per sample."""
        return self.schedule.tables(x.device)["t"][i].expand(x.shape[0])

    def __call__(self, x: torch.Tensor, i: int) -> Prediction:
        kwargs = {}
        if self.y is not None:
            kwargs["y"] = self.y
        if self.low_res is not None:
            kwargs["low_res"] = self.low_res
        out = self.model(x, self.timestep(x, i), **kwargs)
        if self.learn_sigma:
            eps, v = out.split(x.shape[1], dim=1)
            return Prediction(eps, v)
        return Prediction(out)


def as_model_fn(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> ModelFn:
    """Lift a plain eps function (x, i) -> eps into a ``ModelFn`` (fixed variance)."""
    return lambda x, i: Prediction(fn(x, i))
