"""The fused GroupNorm kernels (fused.py) against float64 PyTorch, and inside the networks.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so the same kernel code is checked here and on a GPU (``-m gpu`` runs the
larger CUDA cases). Measured (interpreter, torch 2.13 CPU, Triton 3.9):
- float32 kernels vs float64: 6e-8 to 1.5e-7 relative (forward and input gradient); 3e-6 when
  the input's mean is 60 standard deviations from zero (float32 x A + B cancellation; PyTorch's
  own float32 CPU GroupNorm is at 3.6e-4 on that input);
- float16 storage: 1.9e-4 (forward), 2.9e-4 (gradient): the rounding of the output;
- the four tiny U-Nets, fused vs the float32 exact path: 1.2e-6 to 1.4e-6 (float32), 1.3e-3 to
  1.7e-3 (float16, about the unfused float16 path's 1.8e-3); classifier input gradient 2.1e-6
  (float32) / 3.0e-3 (float16).
On an H200 (``-m gpu``, Triton 3.6) the same tests passed, and benchmarks/accuracy.py gave, for the
full 512x512 and 64x64 models with ``--dtype auto``: U-Net output 0.14% from float32, classifier
gradient 3.4% / 2.5% (bfloat16), uint8 pixels after 10 guided DDIM steps 99% within 1 level.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from adm_cli import fast, fused
from adm_cli.errors import UsageError
from adm_cli.guidance import classifier_grad
from test_fast import TINY, TINY_CLF, exact, inputs, rel_norm


@functools.lru_cache(maxsize=None)
def _kernel_device() -> str | None:
    """Where the kernels can run here: "cuda", "cpu" (Triton's interpreter), or None."""
    if not fused.available():
        return None
    if torch.cuda.is_available():
        return "cuda"
    if not fused.interpreted():
        return None
    try:  # Triton < 3.7's interpreter breaks on numpy >= 2.4 (int() of a 1-element array)
        x = torch.ones(1, 32, 2, 2).contiguous(memory_format=torch.channels_last)
        fused.add_bias(x, x, None)
    except Exception:  # noqa: BLE001
        return None
    return "cpu"


needs_kernels = pytest.mark.skipif(_kernel_device() is None, reason="no Triton (or no working interpreter)")


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


CASES = [  # (n, c, h, w, dtype, in_bias, scale-shift, act, offset, resample)
    (2, 64, 4, 4, torch.float32, None, False, True, 0.0, None),
    (2, 96, 3, 5, torch.float32, "c", True, True, 0.0, None),     # 3 channels per group, odd sizes
    (3, 64, 8, 8, torch.float32, "nc", False, False, 0.0, None),  # embedding added before the norm
    (2, 256, 20, 20, torch.float32, "c", True, True, 30.0, None),  # several programs per sample, far-off mean
    (2, 64, 4, 4, torch.float16, "c", True, True, 0.0, None),
    (2, 192, 4, 4, torch.bfloat16, "nc", False, False, 0.0, None),
    (2, 64, 6, 4, torch.float32, None, False, True, 0.0, "up"),    # BigGAN up block: norm written at 2x
    (2, 64, 6, 4, torch.float32, "c", True, True, 0.0, "down"),    # down block: 2x2 average of the output
    (2, 96, 4, 4, torch.float16, None, False, True, 0.0, "down"),
]
BOUNDS = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


def _run_case(device, n, c, h, w, dtype, ib, ss, act, offset, resample=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = nhwc((torch.randn(n, c, h, w, generator=g) * 0.5 + offset).to(dtype)).to(device)
    gamma = (1 + 0.2 * torch.randn(c, generator=g)).to(device)
    beta = (0.1 * torch.randn(c, generator=g)).to(device)
    in_bias = {None: None, "c": torch.randn(c, generator=g).to(dtype),
               "nc": torch.randn(n, c, generator=g)}[ib]
    in_bias = None if in_bias is None else in_bias.to(device)
    scale = shift = None
    if ss:
        scale, shift = (0.3 * torch.randn(n, 2 * c, generator=g)).to(device).chunk(2, dim=1)  # strided views
    xr = x.detach().double().requires_grad_(True)
    want = fused.reference_group_norm_act(xr, gamma, beta, 1e-5, in_bias=in_bias, scale=scale, shift=shift, act=act,
                                          resample=resample)
    dy = torch.randn(want.shape, generator=g, dtype=torch.float64).to(device)
    (want * dy).sum().backward()
    xf = x.detach().requires_grad_(True)
    got = fused.group_norm_act(xf, gamma, beta, 1e-5, in_bias=in_bias, scale=scale, shift=shift, act=act,
                               resample=resample)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    (got.double() * dy).sum().backward()
    return rel_norm(want.detach(), got.double()), rel_norm(xr.grad, xf.grad.double())


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{str(c[4])[6:]}-{c[5]}-"
                         f"{'ss' if c[6] else 'noss'}-{'silu' if c[7] else 'id'}-{c[8]}-{c[9]}")
def test_group_norm_act_matches_float64(case):
    fwd, bwd = _run_case(_kernel_device(), *case)
    assert fwd <= BOUNDS[case[4]], fwd
    assert bwd <= 2 * BOUNDS[case[4]], bwd


@needs_kernels
def test_group_norm_act_rejects_other_layouts_by_copying():
    """An NCHW input is copied to channels_last (never read with the wrong strides)."""
    dev = _kernel_device()
    x = torch.randn(2, 64, 4, 4, device=dev)  # NCHW
    w, b = torch.ones(64, device=dev), torch.zeros(64, device=dev)
    got = fused.group_norm_act(x, w, b, act=False)
    want = fused.reference_group_norm_act(x, w, b, act=False)
    assert rel_norm(want, got.double()) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("c1,c2,dtype,ss", [(64, 32, torch.float32, True), (96, 64, torch.float32, False),
                                             (160, 96, torch.float16, True), (32, 256, torch.bfloat16, True)])
def test_group_norm_act_over_two_inputs(c1, c2, dtype, ss):
    """The decoder's norm over cat([h, skip], 1) read in place from both tensors: groups and
    channel tiles that straddle the boundary (96 + 64 channels: 5 per group), far-off means,
    several programs per sample; and with gradients it falls back to one concatenated input."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(5)
    n, h, w, c = 2, 12, 10, c1 + c2
    x = nhwc((torch.randn(n, c1, h, w, generator=g) * 0.5 + 3.0).to(dtype)).to(dev)
    x2 = nhwc((torch.randn(n, c2, h, w, generator=g) * 2.0 - 1.0).to(dtype)).to(dev)
    gamma, beta = (1 + 0.2 * torch.randn(c, generator=g)).to(dev), (0.1 * torch.randn(c, generator=g)).to(dev)
    scale = shift = None
    if ss:
        scale, shift = (0.3 * torch.randn(n, 2 * c, generator=g)).to(dev).chunk(2, dim=1)
    want = fused.reference_group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=x2)
    with torch.no_grad():
        got = fused.group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=x2)
    assert got.shape == (n, c, h, w) and got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_norm(want, got.double()) <= BOUNDS[dtype]
    # With autograd on, the same numbers and a gradient for both inputs.
    xa, xb = x.detach().requires_grad_(True), x2.detach().requires_grad_(True)
    y = fused.group_norm_act(xa, gamma, beta, scale=scale, shift=shift, x2=xb)
    assert rel_norm(want, y.double()) <= BOUNDS[dtype]
    y.float().square().sum().backward()
    assert xa.grad.shape == x.shape and xb.grad.shape == x2.shape and xb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot follow"):
        fused.group_norm_act(x, gamma, beta, x2=x2[:, :, :4])


@needs_kernels
def test_results_do_not_depend_on_the_launch_geometry(monkeypatch):
    """Tile size, warps and reduction programs per multiprocessor (what benchmarks/kernels.py
    sweeps, with the statistics' prefetching loop or the plain one) change only the order of
    float32 sums: the same output and input gradient to ~1e-6. 64 programs per multiprocessor
    makes more partial blocks than one step of the per-group kernels reads (their loop runs twice)."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(8)
    x = nhwc(torch.randn(3, 96, 20, 12, generator=g) + 2.0).to(dev)
    x2 = nhwc(torch.randn(3, 64, 20, 12, generator=g)).to(dev)
    gamma, beta = (1 + 0.2 * torch.randn(160, generator=g)).to(dev), (0.1 * torch.randn(160, generator=g)).to(dev)
    scale, shift = (0.3 * torch.randn(3, 320, generator=g)).to(dev).chunk(2, dim=1)
    want = fused.reference_group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=x2)
    xr = x.double().requires_grad_(True)
    want_down = fused.reference_group_norm_act(xr, gamma[:96], beta[:96], resample="down")
    dy = torch.randn(want_down.shape, generator=g, dtype=torch.float64).to(dev)
    (want_grad,) = torch.autograd.grad(want_down, xr, dy)
    for tile, warps, pps, pre in ((4096, 4, 4, False), (512, 2, 1, True), (8192, 8, 16, False), (1024, 4, 2, True),
                                  (512, 2, 64, False)):
        monkeypatch.setattr(fused, "_TILE", tile)
        monkeypatch.setattr(fused, "_WARPS", warps)
        monkeypatch.setattr(fused, "_PROGRAMS_PER_SM", pps)
        monkeypatch.setattr(fused, "_STATS_PREFETCH", pre)
        with torch.no_grad():
            got = fused.group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=x2)
        xf = x.detach().requires_grad_(True)
        down = fused.group_norm_act(xf, gamma[:96], beta[:96], resample="down")
        (grad,) = torch.autograd.grad(down, xf, dy.float())
        setting = (tile, warps, pps, pre)
        assert rel_norm(want, got.double()) <= 1e-6, setting
        assert rel_norm(want_down.detach(), down.double()) <= 1e-6, setting
        assert rel_norm(want_grad, grad.double()) <= 2e-6, setting


def test_closing_bias_is_summed_once_and_follows_the_parameters():
    """A block with a 1x1 skip conv adds both convs' biases in its closing add: summed once, not
    per step, and summed again after an in-place update or a new parameter."""
    from adm_cli.layers import ResBlock

    block = ResBlock(64, 32, 96).requires_grad_(False)
    like = torch.zeros(1)
    first = block._closing_bias(like)
    assert torch.equal(first, block.out_layers[3].bias + block.skip_connection.bias)
    assert block._closing_bias(like) is first  # kept
    block.skip_connection.bias.add_(1.0)
    second = block._closing_bias(like)
    assert torch.allclose(second, first + 1.0)
    block.out_layers[3].bias = torch.nn.Parameter(torch.zeros(96), requires_grad=False)
    assert torch.equal(block._closing_bias(like), block.skip_connection.bias)
    assert "_bias_sum" not in "".join(block.state_dict())
    same = ResBlock(64, 32, 64)
    assert same._closing_bias(like) is same.out_layers[3].bias  # no skip conv: nothing to sum


def test_conv1x1_cat_matches_conv_of_the_concatenation():
    """W [x; x2] = W_x x + W_x2 x2 (plain PyTorch GEMMs, no Triton needed)."""
    g = torch.Generator().manual_seed(6)
    conv = torch.nn.Conv2d(96 + 64, 48, 1)
    x, x2 = nhwc(torch.randn(2, 96, 5, 7, generator=g)), nhwc(torch.randn(2, 64, 5, 7, generator=g))
    conv = conv.to(memory_format=torch.channels_last)
    want = F.conv2d(torch.cat([x, x2], 1).double(), conv.weight.double())
    got = fused.conv1x1_cat(conv, x, x2)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_norm(want, got.double()) <= 1e-6


@needs_kernels
@pytest.mark.parametrize("resample", [None, "up", "down"])
def test_add_bias_and_its_gradient(resample):
    """x + resample(r) + bias, and the gradients of x and r (through the resampling)."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(2)
    r_size = {None: (6, 4), "up": (3, 2), "down": (12, 8)}[resample]
    a = nhwc(torch.randn(2, 96, 6, 4, generator=g)).to(dev).requires_grad_(True)
    r = nhwc(torch.randn(2, 96, *r_size, generator=g)).to(dev).requires_grad_(True)
    bias = torch.randn(96, generator=g).to(dev)
    y = fused.add_bias(a, r, bias, resample=resample)
    ar, rr = a.detach().double().requires_grad_(True), r.detach().double().requires_grad_(True)
    rs = {None: rr, "up": F.interpolate(rr, scale_factor=2, mode="nearest"), "down": F.avg_pool2d(rr, 2)}[resample]
    want = ar + rs + bias.double()[:, None, None]
    assert rel_norm(want, y.double()) <= 1e-6
    dy = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dev)
    (want * dy).sum().backward()
    (y.double() * dy).sum().backward()
    assert rel_norm(ar.grad, a.grad.double()) <= 1e-6 and rel_norm(rr.grad, r.grad.double()) <= 1e-6
    with pytest.raises(ValueError, match="shapes differ"):
        fused.add_bias(a, r[:, :, :2], None, resample=resample)


@needs_kernels
@pytest.mark.parametrize("family,dtype,bound", [("new-order", "float32", 1e-5), ("new-order", "float16", 4e-3),
                                                ("legacy-order", "float16", 4e-3), ("upsampler", "float16", 4e-3),
                                                ("conv-resampling", "float16", 4e-3)])
def test_fused_unet_matches_exact(family, dtype, bound, monkeypatch):
    """The whole U-Net with fused norms (conv biases folded in, the decoder's concatenation
    never written) vs the float32 exact path."""
    cfg = TINY[family]
    ref = exact(cfg)
    dev = _kernel_device()
    ours = fast.prepare(copy.deepcopy(ref), device=dev, dtype=dtype, fused_kernels=True)
    assert "fused GroupNorm" in fast.describe(ours)
    assert ours.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # read by the kernel
    split = []
    monkeypatch.setattr(fused, "conv1x1_cat", lambda *a, _f=fused.conv1x1_cat: split.append(1) or _f(*a))
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, **kw)
        got = ours(x.to(dev), t.to(dev), **{k: v.to(dev) for k, v in kw.items()}).cpu()
    assert len(split) == len(ours.output_blocks)  # every decoder block read h and the skip in place
    assert got.dtype == torch.float32
    assert rel_norm(want, got) <= bound


@needs_kernels
def test_fused_unet_with_the_concatenation_switched_back(monkeypatch):
    """``layers.FUSED_CONCAT = False`` (bench.py --concat): torch.cat again, same output."""
    from adm_cli import layers

    cfg = TINY["new-order"]
    ref = exact(cfg)
    ours = fast.prepare(copy.deepcopy(ref), device=_kernel_device(), dtype="float32", fused_kernels=True)
    monkeypatch.setattr(layers, "FUSED_CONCAT", False)
    monkeypatch.setattr(fused, "conv1x1_cat", lambda *a: pytest.fail("the split skip conv ran"))
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, **kw)
        got = ours(x.to(_kernel_device()), t, **kw).cpu()
    assert rel_norm(want, got) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype,bound", [("float32", 1e-5), ("float16", 1e-2)])
def test_fused_classifier_gradient_matches_exact(dtype, bound):
    ref = exact(TINY_CLF, seed=3)
    dev = _kernel_device()
    x, t, _ = inputs(TINY_CLF)
    y = torch.tensor([0, 3, 7])
    want = classifier_grad(ref, x, t, y, 2.0)
    ours = fast.prepare(copy.deepcopy(ref), device=dev, dtype=dtype, fused_kernels=True)
    got = classifier_grad(ours, x.to(dev), t.to(dev), y.to(dev), 2.0).cpu()
    assert rel_norm(want, got) <= bound


def test_fused_kernel_defaults(monkeypatch):
    assert not fast.use_fused_kernels("cpu")  # CPU keeps its oneDNN path
    assert not fast.use_fused_kernels("cuda", exact=True)
    assert not fast.use_fused_kernels("cuda", compile=True)  # torch.compile fuses on its own
    assert fast.use_fused_kernels("cuda") == fused.available()
    monkeypatch.setenv("ADM_FUSED", "0")
    assert not fast.use_fused_kernels("cuda")
    model = fast.prepare(exact(TINY["new-order"]), device="cpu")
    assert "fused" not in fast.describe(model)
    assert not any(getattr(m, "fused", False) for m in model.modules())


@needs_kernels
def test_fused_needs_channels_last():
    with pytest.raises(UsageError, match="channels_last"):
        fast.prepare(exact(TINY["new-order"]), device=_kernel_device(), fused_kernels=True, channels_last=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_group_norm_act_large(dtype):
    """Real sizes on a GPU: the 512x512 model's first level (128 channels, 4 per group) and a
    768-channel level of the 64x64 model (24 per group, padded to 1,024 lanes)."""
    for shape in ((4, 128, 256, 256), (16, 768, 8, 8)):
        fwd, bwd = _run_case("cuda", *shape, dtype, "c", True, True, 0.5, "down")
        assert fwd <= BOUNDS[dtype] and bwd <= 2 * BOUNDS[dtype], (shape, fwd, bwd)


def test_kernels_compile_for_hopper():
    """Every kernel variant the ops launch compiles for sm_90 (Triton's bundled ptxas, no GPU).

    The interpreter above checks the arithmetic but not what only the compiler rejects (it once
    let through a loop-carried variable whose dtype changed inside the loop)."""
    triton = pytest.importorskip("triton")
    import subprocess
    import sys

    code = r'''
import itertools, os, warnings
warnings.filterwarnings("ignore")
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from adm_cli import _fused_kernels as k
def comp(fn, sig, const):
    sig = dict(sig, **{c: "constexpr" for c in const})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})
dt, i, f = "*fp16", "i32", "*fp32"
geo = dict(HW_IN=i, HW_OUT=i, W_IN=i, W_OUT=i, C=i)
for ib, two, pre in itertools.product((True, False), repeat=3):
    comp(k.stats, dict(X=dt, X2=dt, IB=dt, IB_SN=i, PART=f, HW=i, C=i, C1=i, RPP=i),
         dict(HAS_IB=ib, TWO=two, PREFETCH=pre, BLOCK_R=32, BLOCK_C=128))
comp(k.bwd_finalize, dict(PART=f, M=f, NBLK=i, HW=i, C=i, CPG=i, RPP=i, inv_count="fp32"),
     dict(BLOCK_B=16, GPP=32, BLOCK_G=4))
for ib, ss, grad in itertools.product((True, False), repeat=3):
    comp(k.finalize, dict(PART=f, GAMMA=f, BETA=f, IB=dt, IB_SN=i, SCALE=f, SHIFT=f, SS_SN=i, AFF=f,
                          NBLK=i, HW=i, C=i, CPG=i, RPP=i, eps="fp32"),
         dict(HAS_IB=ib, HAS_SS=ss, GRAD=grad, BLOCK_B=16, GPP=32, BLOCK_G=4))
for act, rs in itertools.product((True, False), (0, 1, 2)):
    for two in (False, True) if rs == 0 else (False,):
        comp(k.apply, dict(X=dt, X2=dt, AFF=f, Y=dt, **geo, C1=i),
             dict(ACT=act, RESAMPLE=rs, TWO=two, BLOCK_R=32, BLOCK_C=128))
    comp(k.bwd_stats, dict(X=dt, DY=dt, AFF=f, PART=f, **geo, RPP=i),
         dict(ACT=act, RESAMPLE=rs, BLOCK_R=32, BLOCK_C=128))
    comp(k.bwd_apply, dict(X=dt, DY=dt, AFF=f, M=f, DX=dt, **geo),
         dict(ACT=act, RESAMPLE=rs, BLOCK_R=32, BLOCK_C=128))
    comp(k.residual_add, dict(X=dt, R=dt, BIAS=dt, Y=dt, HW_OUT=i, HW_R=i, W_R=i, W_OUT=i, C=i),
         dict(HAS_BIAS=act, RESAMPLE=rs, BLOCK_R=32, BLOCK_C=128))
print("compiled")
'''
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip(f"Triton {triton.__version__} has no ASTSource/GPUTarget")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("this Triton build has no ptxas")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_kernel_failure_is_one_clear_error(monkeypatch):
    """A Triton failure (unsupported GPU, broken toolchain) surfaces as a KernelError that says
    how to run without the kernels, not as a compiler traceback."""
    from adm_cli.errors import KernelError

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PTX .version 9.9 does not support .target sm_52\nmore detail")
            return launch

    monkeypatch.setattr(fused, "_kernel", lambda name: Broken())
    x = nhwc(torch.randn(2, 64, 4, 4))
    with pytest.raises(KernelError, match=r"'stats' failed \(RuntimeError: more detail\); set ADM_FUSED=0"):
        fused.group_norm_act(x, torch.ones(64), torch.zeros(64))
