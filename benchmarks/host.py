"""Host (Python + PyTorch dispatch) time of the fused ops, with every kernel launch stubbed out.

    python benchmarks/host.py

Why: on an H200 the guided 64x64 step at batch 64 spent ~100 ms of host time against 52 ms of
GPU work (a few hundred small launches), so what each fused op costs before its kernels even
start is worth knowing, and it can be measured on any machine. The tensors are tiny (2x2
pixels) so that the few real PyTorch ops left (allocations, views) cost what their dispatch
costs. Medians over repeats of 200 calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from adm_cli import fused  # noqa: E402


def timed(fn, calls: int = 200, repeats: int = 7) -> float:
    for _ in range(calls // 4):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=384)
    args = p.parse_args(argv)
    launches = []
    saved = fused._launch
    fused._launch = lambda name, *a, **k: launches.append(name)
    try:
        n, c = args.batch, args.channels
        x = torch.randn(n, c, 2, 2).contiguous(memory_format=torch.channels_last)
        w, b = torch.ones(c), torch.zeros(c)
        scale, shift = torch.randn(n, 2 * c).chunk(2, dim=1)
        dy = torch.randn_like(x)
        xg = x.clone().requires_grad_(True)

        def norm_sampling():
            with torch.no_grad():
                fused.group_norm_act(x, w, b, scale=scale, shift=shift)

        def norm_with_gradient():
            torch.autograd.grad(fused.group_norm_act(xg, w, b, scale=scale, shift=shift), xg, dy)

        def residual_add():
            with torch.no_grad():
                fused.add_bias(x, x, b)

        rows = {}
        for name, fn in (("norm, sampling (no grad)", norm_sampling), ("norm, forward + input gradient",
                         norm_with_gradient), ("residual add", residual_add)):
            launches.clear()
            fn()
            count = len(launches)
            rows[name] = timed(fn)
            print(f"{name}: {rows[name]:.1f} us host, {count} launches", flush=True)
    finally:
        fused._launch = saved
    return rows


if __name__ == "__main__":
    main()
