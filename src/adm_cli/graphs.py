"""CUDA graphs for the sampling step: the network calls of a step captured once, replayed after.

Why: on an H200 the guided 64x64 step at batch 64 with the fused kernels has 52 ms of GPU work
but took 90-136 ms, because the host needed ~100 ms to issue its few hundred small launches
(torch.profiler, ``benchmarks/bench.py --profile``). A replayed graph issues them all in one call.
Not yet timed on a GPU (no session since it was written had one): opt-in only,
``adm sample --cuda-graph`` / ``api.generate(..., cuda_graph=True)`` / ``bench.py --cuda-graph``.

``StepGraph(fn)`` wraps a function of tensors that returns one tensor. The first call with new
input shapes runs ``fn`` twice on a side stream (cuDNN autotuning, Triton compilation, the
allocator's first allocations), then captures one call; every call copies its inputs into the
captured buffers, replays, and returns a copy of the output. Inputs are read only through those
buffers, so ``fn`` must take every varying value as a tensor argument (the timestep ``t`` too,
never a Python index) and must not synchronise with the host. Off CUDA it just calls ``fn``.

Memory: every capture on a device draws from one shared pool. A capture keeps only its output
allocated (each replay's output is copied out at once, and the inputs live outside the pool), so
its temporaries are free for the next capture, and replays never overlap (one stream). So the
U-Net's and the classifier's graphs, and a smaller last batch's, share their scratch memory
instead of each holding a private pool for the whole run.
"""

from __future__ import annotations

from typing import Callable

import torch

_POOLS: dict[torch.device, tuple] = {}


def _pool(device: torch.device) -> tuple:
    """The memory pool every capture on ``device`` shares (see the module docstring)."""
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


class StepGraph:
    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not args[0].is_cuda:
            return self.fn(*args)
        # Inference-mode buffers cannot be written outside inference mode: one capture per mode.
        key = (torch.is_inference_mode_enabled(), *((tuple(a.shape), a.dtype, a.device) for a in args))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args)
        graph, inputs, output = entry
        for buf, a in zip(inputs, args):
            buf.copy_(a)
        graph.replay()
        return output.clone()

    def _capture(self, args: tuple) -> tuple:
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream(device=args[0].device)
        side.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream(args[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_pool(args[0].device)):
            output = self.fn(*inputs)
        return graph, inputs, output


class GraphedUNet:
    """A U-Net whose calls ``(x, t, y=None, low_res=None)`` replay ``StepGraph``s (the
    ``Denoiser`` sees the same interface and ``config``). Use ``graphed_unet`` to get the one
    kept on the module, so that later batches reuse its captures."""

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.config = unet, unet.config
        self._graphs: dict[tuple, StepGraph] = {}

    def __call__(self, x, t, y=None, low_res=None):
        named = [(k, v) for k, v in (("y", y), ("low_res", low_res)) if v is not None]
        kinds = tuple(k for k, _ in named)
        graph = self._graphs.get(kinds)
        if graph is None:
            graph = self._graphs[kinds] = StepGraph(lambda x, t, *extra: self.unet(x, t, **dict(zip(kinds, extra))))
        return graph(x, t, *(v for _, v in named))


def graphed_unet(unet: torch.nn.Module) -> GraphedUNet:
    graphed = getattr(unet, "_adm_graphed", None)
    if graphed is None or graphed.unet is not unet:  # (a deep copy carries its original's)
        graphed = GraphedUNet(unet)
        object.__setattr__(unet, "_adm_graphed", graphed)  # not a submodule: no state_dict entry
    return graphed


def graphed_classifier_grad(classifier: torch.nn.Module, scale: float) -> StepGraph:
    """``StepGraph`` of s * grad_x log p(y | x, t) (``guidance.classifier_grad``, forward and
    backward in one graph), kept on the classifier per scale."""
    from .guidance import classifier_grad

    owner, graphs = getattr(classifier, "_adm_grad_graphs", (None, None))
    if owner is not classifier:  # none yet, or a deep copy's inherited ones
        graphs = {}
        object.__setattr__(classifier, "_adm_grad_graphs", (classifier, graphs))
    if scale not in graphs:
        graphs[scale] = StepGraph(lambda x, t, y: classifier_grad(classifier, x, t, y, scale))
    return graphs[scale]
