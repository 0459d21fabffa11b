"""Per-sample random streams: image k of a run with seed S depends only on (S, k).

Each sample owns a ``torch.Generator`` seeded S + k on the sampling device. It draws x_T
(C x H x W, float32) first, then one tensor per stochastic step in step order, so neither the
batch size nor the way a run is split across processes changes any image.
"""

from __future__ import annotations

from typing import Callable, Sequence

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


def seeds_for(seed: int, indices: Sequence[int]) -> list[int]:
    """The generator seed of each sample index k: S + k."""
    return [int(seed) + int(k) for k in indices]
