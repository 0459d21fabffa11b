"""CUDA graphs for the sampling step: the network calls of a step captured once, replayed after.

Why: on an H200 the guided 64x64 step at batch 64 with the fused kernels has 52 ms of GPU work
but took 90-136 ms, because the host needed ~100 ms to issue its few hundred small launches
(torch.profiler, ``benchmarks/bench.py --profile``). A replayed graph issues them all in one call:
on an H100 that step went from 86 ms (eager, 73-126 over repeats) to 56 ms
(``bench.py --cuda-graph``). ``adm sample`` replays on CUDA by default (``--no-cuda-graph`` turns it
off); the library call is opt-in, ``api.generate(..., cuda_graph=True)``.

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
instead of each holding a private pool for the whole run. The pool lives as long as one graph made
in it does: once every such graph is gone (their networks freed), the next capture starts a new
pool, since PyTorch's allocator refuses to capture into a pool that no graph uses any more (an
internal assertion, seen on an H100 when a second network was captured after the first was freed).
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Callable

import torch

from .errors import GraphCaptureError

_POOLS: dict[torch.device, tuple] = {}
_POOL_USERS: dict[torch.device, int] = {}  # graphs made in _POOLS[device] and not yet freed
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _pool(device: torch.device) -> tuple:
    """The memory pool every capture on ``device`` shares (see the module docstring)."""
    if device not in _POOLS:
        with torch.cuda.device(device):
            _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def _use_pool(graph: object, device: torch.device) -> None:
    """Count ``graph`` as a user of ``_pool(device)`` until it is freed (the last one's going
    drops the pool handle; see the module docstring)."""
    _POOL_USERS[device] = _POOL_USERS.get(device, 0) + 1
    weakref.finalize(graph, _release_pool, device).atexit = False


def _release_pool(device: torch.device) -> None:
    _POOL_USERS[device] -= 1
    if not _POOL_USERS[device]:
        del _POOL_USERS[device]
        _POOLS.pop(device, None)


def pool_bytes(device: torch.device | str) -> int:
    """Device memory the shared capture pool holds now (what the graphs keep reserved between
    replays; ``torch.cuda.max_memory_allocated`` does not see a replay's temporaries)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pool = _POOLS.get(device)
    if pool is None:
        return 0
    return sum(s["total_size"] for s in torch.cuda.memory_snapshot()
               if s.get("device") == device.index and tuple(s.get("segment_pool_id", ())) == tuple(pool))


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream on ``device`` to capture on (``torch.cuda.graph``'s own default is one
    stream for the whole process, made on whichever device was current first)."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _CAPTURE_STREAMS[device]


class _Captures(dict):
    """The graphs kept on a module. A copy or a pickle of the module gets none: captured graphs
    belong to the original's weights (a deep copy replaying them would run the original)."""

    def __deepcopy__(self, memo):
        return _Captures()

    def __reduce__(self):
        return (_Captures, ())


def _captures(module: torch.nn.Module) -> _Captures:
    kept = module.__dict__.get("_adm_captures")
    if kept is None:
        kept = _Captures()
        object.__setattr__(module, "_adm_captures", kept)  # not a submodule: no state_dict entry
    return kept


def forget_graphs(module: torch.nn.Module) -> None:
    """Drop the graphs captured for ``module`` (``fast.prepare`` calls this: a capture reads
    the weights at the addresses they had, which a new dtype, device or layout changes)."""
    module.__dict__.pop("_adm_captures", None)


class StepGraph:
    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not args[0].is_cuda:
            return self.fn(*args)
        # Inference-mode buffers cannot be written outside inference mode: one capture per mode;
        # and one per grad mode (a capture without grad returns outputs that have none).
        key = (torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
               *((tuple(a.shape), a.dtype, a.device) for a in args))
        device = args[0].device
        # Capture and replay run on the current device (the fused kernels launch there, replay
        # uses its stream). ``api.sample_batch`` already makes it the input's; a direct caller
        # on another device gets it switched here (an integer check per call otherwise).
        switch = torch.cuda.current_device() != device.index
        with torch.cuda.device(device) if switch else contextlib.nullcontext():
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(args)
            graph, inputs, output = entry
            for buf, a in zip(inputs, args):
                buf.copy_(a)
            graph.replay()
            return output.clone()

    def _capture(self, args: tuple) -> tuple:
        device = args[0].device
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # eager calls: their errors are the step's own
                self.fn(*inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        # A failure of the capture itself is one line naming the way around (graphs are the
        # command line's default on CUDA, so it must not read as a crash); running out of
        # memory stays itself, whose remedy is a smaller batch.
        try:
            graph, output = self._record(inputs)
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise GraphCaptureError(f"capturing the sampling step as a CUDA graph failed ({first}); run with "
                                    "--no-cuda-graph (api: cuda_graph=False)") from exc
        return graph, inputs, output

    def _record(self, inputs: list) -> tuple:
        device = inputs[0].device
        # The pool's user count must be true from here until the capture has begun (PyTorch
        # counts the new graph only then): graphs that are garbage but not yet collected
        # (networks dropped inside reference cycles of the caller's) are freed first, and no
        # collection may free more in between; before torch 2.9 the capture itself collects.
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            pool = _pool(device)
            graph = torch.cuda.CUDAGraph()
            _use_pool(graph, device)
            with torch.cuda.graph(graph, pool=pool, stream=_capture_stream(device)):
                output = self.fn(*inputs)
        finally:
            if enabled:
                gc.enable()
        return graph, output


class GraphedUNet:
    """A U-Net whose calls ``(x, t, y=None, low_res=None)`` replay ``StepGraph``s (the
    ``Denoiser`` sees the same interface and ``config``). Use ``graphed_unet`` to get the one
    kept on the module, so that later batches reuse its captures. It and its graphs refer to the
    U-Net weakly: kept on the module, a strong reference would make a cycle that only Python's
    cycle collector frees, so a dropped network (an ``--upsample`` run's first stage) would hold
    its weights and graphs until a collection happened to run."""

    def __init__(self, unet: torch.nn.Module):
        self._unet, self.config = weakref.ref(unet), unet.config
        self._graphs: dict[tuple, StepGraph] = {}

    @property
    def unet(self) -> torch.nn.Module:
        return self._unet()

    def __call__(self, x, t, y=None, low_res=None):
        named = [(k, v) for k, v in (("y", y), ("low_res", low_res)) if v is not None]
        kinds = tuple(k for k, _ in named)
        graph = self._graphs.get(kinds)
        if graph is None:
            unet = self._unet  # not self: the function is kept inside self

            def call(x, t, *extra):
                return unet()(x, t, **dict(zip(kinds, extra)))

            graph = self._graphs[kinds] = StepGraph(call)
        return graph(x, t, *(v for _, v in named))


def graphed_unet(unet: torch.nn.Module) -> GraphedUNet:
    captures = _captures(unet)
    if "unet" not in captures:
        captures["unet"] = GraphedUNet(unet)
    return captures["unet"]


def graphed_classifier_grad(classifier: torch.nn.Module, scale: float) -> StepGraph:
    """``StepGraph`` of s * grad_x log p(y | x, t) (``guidance.classifier_grad``, forward and
    backward in one graph), kept on the classifier per scale."""
    from .guidance import classifier_grad

    captures = _captures(classifier)
    key = ("grad", scale)
    if key not in captures:
        ref = weakref.ref(classifier)  # kept on the classifier: no cycle (see GraphedUNet)
        captures[key] = StepGraph(lambda x, t, y: classifier_grad(ref(), x, t, y, scale))
    return captures[key]
