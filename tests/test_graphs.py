"""CUDA-graph replay of the sampling step (graphs.py): same images as the eager step."""

import numpy as np
import pytest
import torch

from adm_cli import api, fast
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
