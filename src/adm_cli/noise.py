"""Per-sample random streams: image k of a run with seed S depends only on (S, k).

Each sample owns a ``torch.Generator`` seeded S + k on the sampling device (the upsampler stage
of a two-stage run: see ``seeds_for``). It draws x_T
(C x H x W, float32) first, then one tensor per stochastic step in step order, so neither the
batch size nor the way a run is split across processes changes any image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


class SampleNoise:
    """A noise function over a batch whose row j comes from generator ``gens[j]``."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seeds = list(seeds)
        self.gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in self.seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        shape = like.shape[1:]
        return torch.stack(
            [torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in self.gens]
        ).to(like.dtype)

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        """x_T for every sample: [N, *shape]."""
        return self(torch.empty((len(self.gens), *shape), device=self.device))


def seeds_for(seed: int, indices: Sequence[int], stream: int = 0) -> list[int]:
    """The generator seed of each sample index k: S + k; for ``stream`` s > 0 (the upsampler of
    a two-stage run) a 64-bit number drawn from numpy's SeedSequence([S, k, s]), so that the
    second stage's noise is independent of the first's (the reference draws fresh noise for
    its super-resolution sampling; S + k again would start it from the base image's x_T)."""
    if stream == 0:
        return [int(seed) + int(k) for k in indices]
    return [int(np.random.SeedSequence([int(seed), int(k), int(stream)]).generate_state(1, np.uint64)[0])
            for k in indices]
