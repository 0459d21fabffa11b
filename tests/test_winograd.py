"""Winograd F(4x4, 3x3) (winograd.py) against direct convolutions, and its use by fast.prepare.

Measured here (CPU, torch 2.13, random weights): a single float32 conv's max |error| / max
|output| against float64 2e-6 to 1e-5 (oneDNN's direct conv 2e-7 to 2.4e-6); the tiny U-Nets
of test_fast (3 weight seeds each) with every 3x3 conv by Winograd against the float32 exact
path 3.5e-6 to 6.7e-6 (the direct fast path 1.1e-6 to 1.7e-6; bound 2e-5); the uint8 images of
test_fast's 10-step DDIM runs, unguided and guided, identical to the exact path's.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adm_cli import api, fast, winograd
from test_fast import TINY, TINY_CLF, exact, inputs, rel_max


def _conv_case(n, c, o, h, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.silu(torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(o, c, 3, 3, generator=g, dtype=torch.float64) / (9 * c) ** 0.5).to(dtype)
    bias = torch.randn(o, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last), weight, bias


def test_transforms_are_exact_in_float64():
    """A^T [(G g G^T) ⊙ (B^T d B)] A is the 3x3 convolution: equal to F.conv2d up to float64
    rounding, on a non-square image with a bias and without."""
    x, weight, bias = _conv_case(2, 5, 7, 8, 12, torch.float64)
    u = winograd.transform_weight(weight)
    assert u.shape == (36, 5, 7) and u.dtype == torch.float64
    for b in (bias, None):
        got = winograd.conv3x3(x, u, b)
        want = F.conv2d(x, weight, b, padding=1)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_transform_matrices():
    """B^T, G and A^T satisfy the 1-D identity y_i = sum_j g_j d_(i+j) for every g and d."""
    bt, g, at = winograd.matrices()
    for i in range(4):
        for j in range(3):
            for k in range(6):
                got = sum(at[i, p] * g[p, j] * bt[p, k] for p in range(6))
                assert abs(got - (1.0 if k == i + j else 0.0)) < 1e-12, (i, j, k)


def test_workspace_is_reused_across_shapes_threads_and_inference_mode():
    """The intermediates' buffers grow to the largest call and are reused; results do not depend
    on what ran before; buffers made under inference_mode still serve calls outside it; each
    thread has its own."""
    import threading

    winograd.release_workspace()
    small, big = _conv_case(1, 8, 8, 8, 8, torch.float32, seed=1), _conv_case(2, 16, 24, 16, 16, torch.float32, seed=2)
    want = {k: F.conv2d(x, w, b, padding=1) for k, (x, w, b) in {"small": small, "big": big}.items()}
    u = {"small": winograd.transform_weight(small[1]), "big": winograd.transform_weight(big[1])}

    def run(key):
        x, _, b = small if key == "small" else big
        return winograd.conv3x3(x, u[key], b)

    with torch.inference_mode():
        first = run("small")
    buffers = dict(winograd._WORKSPACE.buffers)
    assert buffers and not any(t.is_inference() for t in buffers.values())
    for key in ("big", "small", "big"):  # outside inference mode, into buffers made inside it
        assert rel_max(want[key], run(key)) <= 1e-5
    assert torch.equal(first, run("small"))
    sizes = {k: t.numel() for k, t in winograd._WORKSPACE.buffers.items()}
    run("small")
    assert {k: t.numel() for k, t in winograd._WORKSPACE.buffers.items()} == sizes  # no regrowth
    other = {}
    thread = threading.Thread(target=lambda: other.update(out=run("big"), ws=dict(winograd._WORKSPACE.buffers)))
    thread.start()
    thread.join()
    assert rel_max(want["big"], other["out"]) <= 1e-5
    assert all(other["ws"][k] is not t for k, t in winograd._WORKSPACE.buffers.items())
    winograd.release_workspace()
    assert not winograd._WORKSPACE.buffers


@pytest.mark.parametrize("n,c,o,h", [(1, 64, 32, 8), (3, 128, 192, 16), (2, 256, 256, 32)])
def test_float32_error_against_float64(n, c, o, h):
    x, weight, bias = _conv_case(n, c, o, h, h, torch.float32, seed=h)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    got = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    assert got.dtype == torch.float32
    assert rel_max(want, got.double()) <= 3e-5  # measured 2e-6 to 1e-5


def test_worth_it_rule():
    assert winograd.worth_it((4, 384, 32, 32), 384)
    assert winograd.worth_it((4, 768, 8, 8), 768)  # 16 tiles
    assert not winograd.worth_it((1, 768, 8, 8), 768)  # 4 tiles: reading U would dominate
    assert not winograd.worth_it((4, 3, 64, 64), 192)  # the input conv
    assert not winograd.worth_it((4, 192, 64, 64), 6)  # the output conv
    assert not winograd.worth_it((4, 384, 30, 32), 384)  # not a multiple of the tile
    assert winograd.applies(torch.nn.Conv2d(8, 8, 3, padding=1))
    assert not winograd.applies(torch.nn.Conv2d(8, 8, 3, padding=1, stride=2))
    assert not winograd.applies(torch.nn.Conv2d(8, 8, 1))


@pytest.fixture
def everywhere(monkeypatch):
    """Winograd for every 3x3 conv of the tiny networks (the real rule leaves them direct)."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)


def _wino_convs(model):
    return [m for m in model.modules() if getattr(m, "use_winograd", False)]


def _u(conv):
    """The conv's transformed weights as kept (``layers.derived``), or None."""
    kept = conv.__dict__.get("_derived", {}).get("winograd_u")
    return None if kept is None else kept[2]


@pytest.mark.parametrize("family", list(TINY))
def test_unet_with_winograd_matches_exact(family, everywhere):
    cfg = TINY[family]
    ref = exact(cfg)
    ours = fast.prepare(copy.deepcopy(ref), device="cpu", dtype="float32")
    assert _wino_convs(ours) and "Winograd" in fast.describe(ours)
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        a, b = ref(x, t, **kw), ours(x, t, **kw)
    used = [m for m in _wino_convs(ours) if _u(m) is not None]
    assert len(used) >= 4
    assert rel_max(a, b) <= 2e-5  # measured 3.5e-6 to 6.7e-6


def test_short_ddim_run_with_winograd(everywhere):
    """The guided 10-step DDIM run of test_fast: uint8 images as the exact path's."""
    from test_fast import short_ddim_run

    want = short_ddim_run(True, None)
    unet, clf = exact(TINY["new-order"]), exact(TINY_CLF, seed=4)
    unet, clf = fast.prepare_models(unet, clf, device="cpu", dtype="float32")
    assert _wino_convs(unet)
    settings = api.SamplerSettings("ddim", respacing="ddim10", guidance=2.0)
    got = api.generate(unet, classifier=clf, num_samples=4, seed=3, classes=[1, 2, 3, 4], settings=settings,
                       batch_size=4).images.astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and diff.mean() <= 0.01, (diff.max(), diff.mean())


def test_transformed_weights_follow_the_parameters(everywhere):
    """A state_dict loaded into a prepared model (an in-place write) recomputes U; copies do not
    carry it; a second prepare without Winograd drops it."""
    cfg = TINY["new-order"]
    ours = fast.prepare(exact(cfg), device="cpu", dtype="float32")
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        ours(x, t, **kw)
    other = exact(cfg, seed=7)
    ours.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_max(other(x, t, **kw), ours(x, t, **kw)) <= 2e-5
    assert all(_u(m) is None for m in _wino_convs(copy.deepcopy(ours)))
    fast.prepare(ours, device="cpu", dtype="float32", winograd_convs=False)
    assert not _wino_convs(ours) and not any(_u(m) is not None for m in ours.modules())


def test_switch_and_ram_budget(everywhere, monkeypatch):
    cfg = TINY["new-order"]
    monkeypatch.setenv("ADM_WINOGRAD", "0")
    assert not _wino_convs(fast.prepare(exact(cfg), device="cpu", dtype="float32"))
    monkeypatch.delenv("ADM_WINOGRAD")
    assert _wino_convs(fast.prepare(exact(cfg), device="cpu", dtype="float32"))
    monkeypatch.setattr(fast, "WINOGRAD_RAM_FRACTION", 1e-9)  # U would not fit: direct convs
    assert not _wino_convs(fast.prepare(exact(cfg), device="cpu", dtype="float32"))
    # neither the classifier (autograd) nor the exact path nor half precision use it
    monkeypatch.setattr(fast, "WINOGRAD_RAM_FRACTION", 0.25)
    assert not _wino_convs(fast.prepare(exact(TINY_CLF), device="cpu", dtype="float32"))
    assert not _wino_convs(fast.prepare(exact(cfg), device="cpu", dtype="float32", exact=True))
    assert not _wino_convs(fast.prepare(exact(cfg), device="cpu", dtype="bfloat16"))
