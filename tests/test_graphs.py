"""CUDA-graph replay of the sampling step (graphs.py): same images as the eager step."""

import contextlib
import gc

import numpy as np
import pytest
import torch

from adm_cli import api, fast, graphs
from adm_cli.graphs import StepGraph, graphed_unet
from test_fast import TINY, TINY_CLF, exact


def test_step_graph_off_cuda_just_calls():
    calls = []
    graph = StepGraph(lambda x: calls.append(1) or x * 2)
    x = torch.ones(3)
    assert torch.equal(graph(x), x * 2) and torch.equal(graph(x), x * 2)
    assert len(calls) == 2 and not graph._graphs  # nothing captured on CPU


def test_cuda_graph_flag_is_ignored_on_cpu():
    cfg = TINY["new-order"]
    unet = fast.prepare(exact(cfg), device="cpu")
    settings = api.SamplerSettings("ddim", steps=3)
    run = dict(num_samples=2, classes=[1, 2], settings=settings, batch_size=2, seed=4)
    a = api.generate(unet, **run).images
    b = api.generate(unet, cuda_graph=True, **run).images
    assert np.array_equal(a, b)
    assert "_adm_captures" not in unet.__dict__


def test_capture_pool_outlives_no_graph(monkeypatch):
    """The shared capture pool is kept while any graph made in it lives, and replaced once all
    are freed: PyTorch's allocator asserts when a capture reuses a pool no graph holds (on an
    H100 the 512x512 capture failed so after the 64x64 networks of the run before were freed)."""
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, next(handles)))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "_POOLS", {})
    monkeypatch.setattr(graphs, "_POOL_USERS", {})

    class Graph:  # stands in for torch.cuda.CUDAGraph (weak-referenceable, freed when dropped)
        pass

    dev, other = torch.device("cuda", 0), torch.device("cuda", 1)
    first = graphs._pool(dev)
    a, b, c = Graph(), Graph(), Graph()
    for g, d in ((a, dev), (b, dev), (c, other)):
        graphs._use_pool(g, d)
    del a
    gc.collect()
    assert graphs._pool(dev) == first  # b still replays in it
    del b
    gc.collect()
    fresh = graphs._pool(dev)
    assert fresh != first and graphs._pool(dev) == fresh
    assert graphs._POOL_USERS == {other: 1}  # the other device's pool is untouched


@pytest.mark.gpu
def test_gpu_capture_after_earlier_networks_are_freed():
    """A second pair of networks captures and replays after the first pair and its graphs are
    gone (a long-lived process: bench.py's cases, an API user's successive models)."""
    cfg = TINY["new-order"]
    settings = api.SamplerSettings("ddpm", steps=3, guidance=1.0)
    for seed in (0, 1):
        unet, clf = fast.prepare_models(exact(cfg, seed=seed), exact(TINY_CLF, seed=4 + seed), device="cuda")
        run = dict(num_samples=2, classes=[1, 2], settings=settings, batch_size=2, seed=7, classifier=clf)
        eager = api.generate(unet, **run).images.astype(int)
        assert np.abs(api.generate(unet, cuda_graph=True, **run).images - eager).max() <= 1
        assert graphs.pool_bytes("cuda") > 0
        del unet, clf, run
        gc.collect()
    assert graphs.pool_bytes("cuda") == 0 and not graphs._POOL_USERS


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_gpu_graphed_sampling_matches_eager(sampler):
    """Guided sampling with both networks' calls replayed as graphs gives the eager images; the
    captures are reused across batches of the same size (one more for the smaller last batch)."""
    cfg = TINY["new-order"]
    unet, clf = fast.prepare_models(exact(cfg), exact(TINY_CLF, seed=4), device="cuda")
    settings = api.SamplerSettings(sampler, steps=4, guidance=2.0)
    run = dict(num_samples=5, classes=[1, 2, 3, 4, 5], settings=settings, batch_size=2, seed=7, classifier=clf)
    eager = api.generate(unet, **run).images.astype(int)
    graphed = api.generate(unet, cuda_graph=True, **run).images.astype(int)
    assert np.abs(eager - graphed).max() <= 1
    assert len(graphed_unet(unet)._graphs[("y",)]._graphs) == 2  # batch 2 and the last batch of 1
    again = api.generate(unet, cuda_graph=True, **run).images.astype(int)
    # Replays read fresh inputs (a stale buffer would change whole images); cuDNN's backward
    # convolutions may sum in another order from run to run, hence one level.
    assert np.abs(again - graphed).max() <= 1
    unguided = api.SamplerSettings(sampler, steps=4)  # inference mode: captured separately
    plain = api.generate(unet, **dict(run, settings=unguided, classifier=None)).images.astype(int)
    assert np.abs(api.generate(unet, cuda_graph=True, **dict(run, settings=unguided, classifier=None)).images
                  - plain).max() <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TINY))
def test_gpu_graphs_every_architecture_and_sampler(name):
    """What `adm sample` now does by default on CUDA: replayed steps give the eager images for
    both attention orders, conv resampling without scale-shift, and an upsampler (its low_res
    input is one more captured argument), under each sampler."""
    cfg = TINY[name]
    unet = fast.prepare(exact(cfg), device="cuda")
    low_res = None
    if cfg.is_super_res:
        low_res = np.random.default_rng(0).integers(0, 256, (3, cfg.small_size, cfg.small_size, 3), dtype=np.uint8)
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        run = dict(num_samples=3, classes=[1, 2, 3] if cfg.class_cond else None, batch_size=2, seed=5,
                   settings=api.SamplerSettings(sampler, steps=4), low_res=low_res)
        eager = api.generate(unet, **run).images.astype(int)
        assert np.abs(api.generate(unet, cuda_graph=True, **run).images - eager).max() <= 1, sampler


@pytest.mark.parametrize("exc,kind", [
    (RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be reported"),
     "capture"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "memory"),
    (RuntimeError("CUDA error: out of memory"), "memory"),
])
def test_a_failed_capture_is_one_line_naming_the_way_around(monkeypatch, exc, kind):
    """Graphs are adm sample's default on CUDA: a capture that fails is a one-line error that
    names --no-cuda-graph, while running out of memory stays itself (the runner's remedy is a
    smaller --batch-size)."""
    from adm_cli.errors import GraphCaptureError

    def fail(self, inputs):
        raise exc

    calls = []
    monkeypatch.setattr(StepGraph, "_record", fail)
    class Stream:  # the warm-up's streams, off CUDA
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    with pytest.raises(GraphCaptureError if kind == "capture" else type(exc)) as got:
        StepGraph(lambda x: calls.append(1) or x)._capture((torch.ones(2),))
    assert len(calls) == 2  # the eager warm-up ran, outside the wrapping
    if kind == "capture":
        assert "\n" not in str(got.value) and "--no-cuda-graph" in str(got.value)
        assert "operation not permitted when stream is capturing" in str(got.value)
    else:
        assert got.value is exc


def test_graphed_networks_are_freed_when_dropped():
    """The graphs kept on a network refer to it weakly: dropping the network frees it and its
    graphs at once, without waiting for Python's cycle collector (an --upsample run drops its
    first stage's networks before the second stage sizes its batch and captures)."""
    unet, clf = fast.prepare_models(exact(TINY["new-order"]), exact(TINY_CLF, seed=4), device="cpu")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), torch.tensor([1, 2])
    graphed_unet(unet)(x, t, y)  # off CUDA the StepGraphs call through: their functions exist now
    graphs.graphed_classifier_grad(clf, 1.0)(x, t, y)
    refs = [weakref_of(m) for m in (unet, clf, graphed_unet(unet))]
    was = gc.isenabled()
    gc.disable()
    try:
        del unet, clf
        assert [r() for r in refs] == [None, None, None]
    finally:
        if was:
            gc.enable()


def weakref_of(obj):
    import weakref

    return weakref.ref(obj)


def test_capture_counts_its_graph_and_collects_first(monkeypatch):
    """StepGraph._record captures into the shared pool and counts its graph as a user: the pool
    is kept while a graph made in it lives, and a new one is taken once they are all freed, also
    when the last one was garbage in a reference cycle (collected before the capture begins, as
    torch < 2.9's capture would collect it just after the pool was chosen)."""
    handles = iter(range(100))
    pools = []

    class Graph:
        pass

    @contextlib.contextmanager
    def capture(graph, pool, stream):
        assert not gc.isenabled()  # no collection may free a pool user during the capture
        pools.append(pool)
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, next(handles)))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(graphs, "_capture_stream", lambda device: None)
    monkeypatch.setattr(graphs, "_POOLS", {})
    monkeypatch.setattr(graphs, "_POOL_USERS", {})
    step = StepGraph(lambda x: x + 1)
    x = torch.ones(2)
    a, out = step._record([x])
    assert torch.equal(out, x + 1) and gc.isenabled()
    b, _ = step._record([x])
    assert pools[1] == pools[0]  # a still lives
    del a, b
    c, _ = step._record([x])
    assert pools[2] != pools[1]  # both freed: a new pool
    cycle = [c]
    cycle.append(cycle)
    del c, cycle  # garbage, but only the cycle collector frees it
    step._record([x])
    assert pools[3] != pools[2]
