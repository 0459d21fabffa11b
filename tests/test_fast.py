"""The fast path (fast.prepare) against the float32 exact path, on random weights.

Measured with these tiny networks (CPU, torch 2.13; 3 weight seeds), float32 exact as the truth:
- float32 fast path (SDPA + channels_last): max |diff| / max |ref| 1.5e-6 to 1.8e-6.
- model output, ||fast - exact|| / ||exact||: float16 1.8e-3 to 1.9e-3, bfloat16 1.45e-2 to 1.5e-2.
- uint8 images after 10 DDIM steps (4 images of 16x16, unguided and guided at scale 2):
  float32 at most 1 level (a truncation boundary), mean 0.000; float16 at most 2 levels, mean
  0.05-0.06, 99th percentile 1; bfloat16 at most 13-17 levels, mean 0.37-0.46, 99th percentile
  6-7 (1.0-1.5 levels on average over the 27-40% of pixels that are not clipped to 0 or 255).
  Random networks do not denoise (most pixels end clipped), so their trajectories are more
  sensitive than a trained model's. Bounds below leave ~1.5x headroom over the worst seen.
- The first trained demo model (3-channel, since replaced), 8 images, DDIM 10 and 25 steps,
  unguided and guided at scale 2: float16 at most 1 level (mean 0.015-0.027), bfloat16 at most
  2-3 levels (mean 0.24-0.32), float32 at most 1 (mean 0.000). The bundled grey model, 4 guided
  images, DDIM 10: bfloat16 at most 7 levels (mean 0.31).
"""

import copy
import functools
import importlib.resources

import numpy as np
import pytest
import torch

from adm_cli import api, fast
from adm_cli.config import ClassifierConfig, get_preset
from adm_cli.errors import UsageError
from adm_cli.guidance import classifier_grad
from adm_cli.models import build_model, set_exact_attention
from conftest import randomize

TINY = {  # both attention orders, an upsampler (low_res input), Upsample/Downsample modules
    "new-order": get_preset("64x64_diffusion").replace(
        num_channels=32, num_res_blocks=1, image_size=16, channel_mult="1,2", attention_resolutions="8",
        num_head_channels=32, num_classes=10),
    "legacy-order": get_preset("256x256_diffusion").replace(
        num_channels=32, num_res_blocks=1, image_size=16, channel_mult="1,2", attention_resolutions="8,4",
        num_head_channels=32, num_classes=10),
    "upsampler": get_preset("64_256_upsampler").replace(
        num_channels=32, num_res_blocks=1, image_size=16, small_size=8, channel_mult="1,2",
        attention_resolutions="8", num_classes=10),
    "conv-resampling": get_preset("256x256_diffusion").replace(
        num_channels=32, num_res_blocks=1, image_size=16, channel_mult="1,2", attention_resolutions="8",
        num_head_channels=32, num_classes=10, use_scale_shift_norm=False, resblock_updown=False,
        learn_sigma=False),
}
TINY_CLF = ClassifierConfig(image_size=16, classifier_width=32, classifier_depth=1, channel_mult="1,2",
                            classifier_attention_resolutions="8", num_head_channels=32, num_classes=10,
                            noise_schedule="cosine")
# (max level difference, mean level difference) allowed after a 10-step DDIM run.
UINT8_BOUNDS = {"float32": (1, 0.01), "float16": (3, 0.1), "bfloat16": (25, 0.7)}
OUTPUT_BOUNDS = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 2.5e-2}


def exact(cfg, seed=0):
    return set_exact_attention(randomize(build_model(cfg), seed=seed).eval(), True)


def inputs(cfg, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([5, 500, 990][:n])
    kw = {"y": torch.tensor([1, 4, 9][:n])} if getattr(cfg, "class_cond", False) else {}
    if getattr(cfg, "is_super_res", False):
        kw["low_res"] = torch.randn(n, 3, cfg.small_size, cfg.small_size, generator=g)
    return x, t, kw


def rel_max(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def rel_norm(a, b):
    return ((a - b).norm() / a.norm()).item()


def test_resolve_dtype():
    assert fast.resolve_dtype("auto", "cpu") == torch.float32
    assert fast.resolve_dtype(None, "cpu") == torch.float32
    assert fast.resolve_dtype("auto", "cuda") == fast.AUTO_CUDA_DTYPE == torch.float16  # no device needed
    # the classifier's input gradient is far more accurate in bfloat16 (see fast.py)
    assert fast.resolve_dtype("auto", "cuda", classifier=True) == torch.bfloat16
    assert fast.resolve_dtype("fp16", "cuda", classifier=True) == torch.float16  # explicit wins
    assert fast.resolve_dtype("auto", "cpu", classifier=True) == torch.float32
    assert fast.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert fast.resolve_dtype("Float16", "cuda") == torch.float16
    assert fast.resolve_dtype(torch.float32, "cuda") == torch.float32
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        fast.resolve_dtype("int8", "cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_prepare_keeps_openai_state_dict(dtype):
    model = exact(TINY["new-order"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fast.prepare(model, device="cpu", dtype=dtype)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    fresh = build_model(TINY["new-order"])
    fresh.load_state_dict(model.state_dict(), strict=True)  # loads back (dtypes are cast on copy)
    want = fast.resolve_dtype(dtype, "cpu")
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == want
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GroupNorm stays float32
    assert model.time_embed[0].weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert "channels_last" in fast.describe(model)


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_float32_fast_path_matches_exact(family, channels_last):
    cfg = TINY[family]
    ref = exact(cfg)
    ours = fast.prepare(copy.deepcopy(ref), device="cpu", dtype="float32", channels_last=channels_last)
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        a, b = ref(x, t, **kw), ours(x, t, **kw)
    assert b.is_contiguous() and b.dtype == torch.float32
    assert rel_max(a, b) <= 1e-5


def test_classifier_fast_path_matches_exact():
    ref = exact(TINY_CLF, seed=3)
    x, t, _ = inputs(TINY_CLF)
    y = torch.tensor([0, 3, 7])
    with torch.no_grad():
        logits = ref(x, t)
    grad = classifier_grad(ref, x, t, y, 2.0)
    for dtype, bound in (("float32", 1e-5), ("bfloat16", 6e-2), ("float16", 1e-2)):
        ours = fast.prepare(copy.deepcopy(ref), device="cpu", dtype=dtype)
        with torch.no_grad():
            assert rel_norm(logits, ours(x, t)) <= bound, dtype
        assert rel_norm(grad, classifier_grad(ours, x, t, y, 2.0)) <= bound, dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_model_output_error(dtype):
    cfg = TINY["new-order"]
    ref = exact(cfg)
    ours = fast.prepare(copy.deepcopy(ref), device="cpu", dtype=dtype)
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        a, b = ref(x, t, **kw), ours(x, t, **kw)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert rel_norm(a, b) <= OUTPUT_BOUNDS[dtype]


@functools.lru_cache(maxsize=None)
def short_ddim_run(guided: bool, dtype: str | None) -> np.ndarray:
    """uint8 images of a 10-step DDIM run through the public API (dtype None: the exact path)."""
    unet, clf = exact(TINY["new-order"]), exact(TINY_CLF, seed=4)
    if dtype is not None:
        unet, clf = fast.prepare_models(unet, clf, device="cpu", dtype=dtype)
    settings = api.SamplerSettings("ddim", respacing="ddim10", guidance=2.0 if guided else 0.0)
    out = api.generate(unet, classifier=clf, num_samples=4, seed=3, classes=[1, 2, 3, 4], settings=settings,
                       batch_size=4)
    return out.images.astype(int)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_short_ddim_run_uint8_levels(dtype, guided):
    """10 DDIM steps: fast path vs the float32 exact path, as uint8 images."""
    want, got = short_ddim_run(guided, None), short_ddim_run(guided, dtype)
    diff = np.abs(got - want)
    max_levels, mean_levels = UINT8_BOUNDS[dtype]
    assert diff.max() <= max_levels, (diff.max(), diff.mean())
    assert diff.mean() <= mean_levels, (diff.max(), diff.mean())


DEMO = importlib.resources.files("adm_cli") / "demo"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "demo-digits.safetensors").is_file(), reason="demo weights not built")
# Measured with the bundled weights (grey model, 2,500 steps): bfloat16 at most 7 levels (mean
# 0.31); float16 within the bound below. Bounds leave ~1.4x headroom.
@pytest.mark.parametrize("dtype,max_levels,mean_levels", [("float16", 2, 0.06), ("bfloat16", 10, 0.5)])
def test_trained_demo_model_uint8_levels(dtype, max_levels, mean_levels):
    """The same check on trained weights (the bundled digits demo), guided: a few levels at most."""
    diff = np.abs(demo_run(dtype) - demo_run(None))
    assert diff.max() <= max_levels and diff.mean() <= mean_levels, (diff.max(), diff.mean())


@functools.lru_cache(maxsize=None)
def demo_run(dtype: str | None) -> np.ndarray:
    from adm_cli.weights import load_model

    unet = set_exact_attention(load_model(DEMO / "demo-digits.safetensors"), True)
    clf = set_exact_attention(load_model(DEMO / "demo-digits-classifier.safetensors"), True)
    if dtype is not None:
        unet, clf = fast.prepare_models(unet, clf, device="cpu", dtype=dtype)
    settings = api.SamplerSettings("ddim", respacing="ddim10", guidance=2.0)
    out = api.generate(unet, classifier=clf, num_samples=4, seed=0, classes=[0, 1, 2, 3], batch_size=4,
                       settings=settings)
    return out.images.astype(int)


def test_auto_batch_size_on_cpu(monkeypatch):
    unet = build_model(TINY["new-order"])
    settings = api.SamplerSettings("ddim", steps=10)
    assert fast.auto_batch_size(unet, None, settings, "cpu", 100) == fast.CPU_BATCH
    assert fast.auto_batch_size(unet, None, settings, "cpu", 3) == 3
    monkeypatch.setenv("ADM_CPU_BATCH", "2")
    assert fast.auto_batch_size(unet, None, settings, torch.device("cpu"), 100) == 2


@pytest.mark.slow
def test_compiled_model_matches_eager():
    """torch.compile in place: same numbers, same state_dict keys (no ``_orig_mod.`` prefix).
    Slow: inductor's CPU warm-up is over a minute even for this tiny network."""
    cfg = TINY["new-order"]
    ref = exact(cfg)
    ours = fast.prepare(copy.deepcopy(ref), device="cpu", dtype="float32", compile=True)
    assert fast.is_compiled(ours) and list(ours.state_dict()) == list(ref.state_dict())
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        assert rel_max(ref(x, t, **kw), ours(x, t, **kw)) <= 1e-4


# -- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_precision_matches_float32(dtype):
    cfg = TINY["legacy-order"]
    ref = exact(cfg)
    ours = fast.prepare(copy.deepcopy(ref), device="cuda", dtype=dtype)
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        a = ref(x, t, **kw)
        b = ours(x.cuda(), t.cuda(), **{k: v.cuda() for k, v in kw.items()}).cpu()
    assert rel_norm(a, b) <= OUTPUT_BOUNDS[dtype]


@pytest.mark.gpu
def test_gpu_guided_sampling_never_synchronises():
    """No .item(), no tensor->bool, no device->host copy inside the sampling loop."""
    from adm_cli.denoiser import Denoiser
    from adm_cli.guidance import classifier_guidance
    from adm_cli.noise import SampleNoise
    from adm_cli.samplers import SAMPLERS
    from adm_cli.schedule import Schedule

    cfg = TINY["new-order"]
    unet, clf = fast.prepare_models(exact(cfg), exact(TINY_CLF, seed=4), device="cuda", dtype="auto")
    sched = Schedule.create(cfg.noise_schedule, cfg.diffusion_steps, "5")
    noise = SampleNoise([0, 1], "cuda")
    x = noise.initial((3, 16, 16))
    sched.tables(x.device)  # copied to the device once, before the loop (keyed by "cuda:0")
    y = torch.tensor([1, 2], device="cuda")
    fn = classifier_guidance(Denoiser(unet, sched, y=y), clf, sched, y, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in ("ddpm", "ddim"):
            with torch.no_grad():
                out = SAMPLERS[name](fn, x, sched, noise=noise, variance=cfg.variance)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_gpu_auto_batch_size_and_compile():
    cfg = TINY["new-order"]
    unet, clf = fast.prepare_models(exact(cfg), exact(TINY_CLF, seed=4), device="cuda", compile=True)
    settings = api.SamplerSettings("ddpm", steps=2, guidance=1.0)
    n = fast.auto_batch_size(unet, clf, settings, "cuda", 10_000)
    assert 8 <= n <= 10_000
    # With CUDA graphs both networks' memory is held at once: never a larger batch.
    assert 1 <= fast.auto_batch_size(unet, clf, settings, "cuda", 10_000, cuda_graph=True) <= n
    out = api.generate(unet, classifier=clf, num_samples=2, classes=[1, 2], settings=settings, batch_size=2)
    assert out.images.shape == (2, 16, 16, 3)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (20.0, 1.0), (100.0, 1.0), (3.0, 1e-3), (0.0, 1e-4)])
def test_channels_last_group_norm_is_as_accurate_as_nchw(mean, std):
    """The CPU fast path's activations are channels_last; torch's kernel for that layout loses
    ~(mean/std)^2 x its float32 sums' rounding (3e-4 at mean 20 std over 64x64 pixels, 1e-2 at
    100, measured). GroupNorm32 must stay within a few times the NCHW kernel's error (float64 as
    the truth), small variances (where eps counts) included."""
    from adm_cli.layers import GroupNorm32

    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(2, 128, 64, 64, generator=g, dtype=torch.float64) * std + mean
    norm = GroupNorm32(128)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(128, generator=g))
        norm.bias.copy_(torch.randn(128, generator=g))
    truth = torch.nn.functional.group_norm(x64, 32, norm.weight.double(), norm.bias.double(), norm.eps)
    err = lambda y: ((y.double() - truth).abs().max() / truth.abs().max()).item()  # noqa: E731
    x = x64.float()
    with torch.no_grad():
        nchw = err(norm(x))
        nhwc = norm(x.contiguous(memory_format=torch.channels_last))
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert err(nhwc) <= max(3 * nchw, 2e-6), (err(nhwc), nchw)
