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
import itertools

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


def _two_inputs(c1, c2, dtype, size, ss, seed):
    """x, x2 (the decoder's h and skip: means 3 and -1), gamma, beta, scale, shift (or None) and
    the generator, for a norm over cat([x, x2], 1) at batch 2."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(seed)
    n, c = 2, c1 + c2
    x = nhwc((torch.randn(n, c1, *size, generator=g) * 0.5 + 3.0).to(dtype)).to(dev)
    x2 = nhwc((torch.randn(n, c2, *size, generator=g) * 2.0 - 1.0).to(dtype)).to(dev)
    gamma, beta = (1 + 0.2 * torch.randn(c, generator=g)).to(dev), (0.1 * torch.randn(c, generator=g)).to(dev)
    scale = shift = None
    if ss:
        scale, shift = (0.3 * torch.randn(n, 2 * c, generator=g)).to(dev).chunk(2, dim=1)
    return x, x2, gamma, beta, scale, shift, g


@needs_kernels
@pytest.mark.parametrize("c1,c2,dtype,ss", [(64, 32, torch.float32, True), (96, 64, torch.float32, False),
                                             (160, 96, torch.float16, True), (32, 256, torch.bfloat16, True)])
def test_group_norm_act_over_two_inputs(c1, c2, dtype, ss):
    """The decoder's norm over cat([h, skip], 1) read in place from both tensors: groups and
    channel tiles that straddle the boundary (96 + 64 channels: 5 per group), far-off means,
    several programs per sample; and with gradients it falls back to one concatenated input."""
    x, x2, gamma, beta, scale, shift, _ = _two_inputs(c1, c2, dtype, (12, 10), ss, seed=5)
    n, c, h, w = x.shape[0], c1 + c2, *x.shape[2:]
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


def _stats_reads(monkeypatch) -> list[int]:
    """Elements each launch of the statistics kernel reads from now on (recorded per launch)."""
    reads = []

    def launch(name, grid, *args, _f=fused._launch, **meta):
        if name == "stats":
            reads.append(args[0].numel() + (args[1].numel() if meta["TWO"] else 0))
        return _f(name, grid, *args, **meta)

    monkeypatch.setattr(fused, "_launch", launch)
    return reads


@needs_kernels
@pytest.mark.parametrize("c1,c2,dtype", [(64, 32, torch.float32), (160, 96, torch.float16), (32, 256, torch.bfloat16)])
def test_shared_statistics_reuse_the_second_inputs(c1, c2, dtype, monkeypatch):
    """Inside ``shared_statistics`` a norm over cat([h, skip], 1) takes the skip's statistics
    kept by an earlier norm over the skip alone and reads only h: the same numbers as the
    float64 reference. The two inputs' blocks differ in size and count, and groups straddle the
    boundary (64 + 32 channels: 3 per group). Another scope, or none, takes them anew."""
    dev = _kernel_device()
    x, skip, gamma, beta, scale, shift, g = _two_inputs(c1, c2, dtype, (16, 12), True, seed=11)
    n, h, w = x.shape[0], *x.shape[2:]
    g2, b2 = gamma[c1:].contiguous(), beta[c1:].contiguous()
    want = fused.reference_group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=skip)
    assert fused._split(h * w, n, fused._blocks(c1)[0], skip.device) != \
        fused._split(h * w, n, fused._blocks(c2)[0], skip.device)  # (the two inputs' blocks differ)
    reads = _stats_reads(monkeypatch)
    with torch.no_grad():
        with fused.shared_statistics():
            alone = fused.group_norm_act(skip, g2, b2)  # the encoder's norm over the skip
            assert reads == [skip.numel()]
            got = fused.group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=skip)
            assert reads == [skip.numel(), x.numel()]  # h only
            again = fused.group_norm_act(skip, g2, b2)
            assert reads == [skip.numel(), x.numel()] and torch.equal(again, alone)
        assert rel_norm(want, got.double()) <= BOUNDS[dtype]
        assert rel_norm(fused.reference_group_norm_act(skip, g2, b2), alone.double()) <= BOUNDS[dtype]
        with fused.shared_statistics():  # kept statistics belong to their scope
            fused.group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=skip)
        fused.group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=skip)
    assert reads[2:] == [x.numel(), skip.numel(), x.numel() + skip.numel()]
    # a norm with an input bias (a block's second norm) neither keeps nor takes kept statistics
    with torch.no_grad(), fused.shared_statistics():
        ib = torch.randn(c2, generator=g).to(dev)
        fused.group_norm_act(skip, g2, b2)
        biased = fused.group_norm_act(skip, g2, b2, in_bias=ib)
    assert reads[-2:] == [skip.numel(), skip.numel()]
    assert rel_norm(fused.reference_group_norm_act(skip, g2, b2, in_bias=ib), biased.double()) <= BOUNDS[dtype]
    # the per-group combination run wide (as over many kept 128-row blocks): the same numbers
    monkeypatch.setattr(fused, "_WIDE_FINALIZE_BLOCKS", 0)
    with torch.no_grad(), fused.shared_statistics():
        fused.group_norm_act(skip, g2, b2)
        wide = fused.group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=skip)
    assert rel_norm(got.double(), wide.double()) <= (1e-6 if dtype == torch.float32 else BOUNDS[dtype])
    assert rel_norm(want, wide.double()) <= BOUNDS[dtype]


@needs_kernels
def test_results_do_not_depend_on_the_launch_geometry(monkeypatch):
    """Tile size, warps and reduction programs per multiprocessor (what benchmarks/kernels.py
    sweeps, with the statistics' prefetching loop or the plain one, the row loops pipelined or
    not) change only the order of float32 sums: the same output and input gradient to ~1e-6. 64
    programs per multiprocessor makes more partial blocks than one step of the per-group kernels
    reads (their loop runs twice); the sixth setting runs those kernels wide (as for the 128-row
    blocks of kept statistics)."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(8)
    # (two samples: per-sample strides are exercised; a third only adds interpreter time)
    x = nhwc(torch.randn(2, 96, 12, 8, generator=g) + 2.0).to(dev)
    x2 = nhwc(torch.randn(2, 64, 12, 8, generator=g)).to(dev)
    gamma, beta = (1 + 0.2 * torch.randn(160, generator=g)).to(dev), (0.1 * torch.randn(160, generator=g)).to(dev)
    scale, shift = (0.3 * torch.randn(2, 320, generator=g)).to(dev).chunk(2, dim=1)
    want = fused.reference_group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=x2)
    xr = x.double().requires_grad_(True)
    want_down = fused.reference_group_norm_act(xr, gamma[:96], beta[:96], resample="down")
    dy = torch.randn(want_down.shape, generator=g, dtype=torch.float64).to(dev)
    (want_grad,) = torch.autograd.grad(want_down, xr, dy)
    for tile, warps, pps, pre, wide, stages in ((4096, 4, 4, False, 64, 1), (512, 2, 1, True, 64, 1),
                                                (8192, 8, 16, False, 64, 3), (1024, 4, 2, True, 64, 1),
                                                (512, 2, 64, False, 64, 1), (512, 2, 64, False, 0, 1),
                                                (512, 2, 1, False, 64, 2)):
        monkeypatch.setattr(fused, "_WIDE_FINALIZE_BLOCKS", wide)  # (0: the wide per-group kernels)
        monkeypatch.setattr(fused, "_LOOP_STAGES", stages)
        monkeypatch.setattr(fused, "_TILE", tile)
        monkeypatch.setattr(fused, "_WARPS", warps)
        monkeypatch.setattr(fused, "_PROGRAMS_PER_SM", pps)
        monkeypatch.setattr(fused, "_STATS_PREFETCH", pre)
        with torch.no_grad():
            got = fused.group_norm_act(x, gamma, beta, scale=scale, shift=shift, x2=x2)
        xf = x.detach().requires_grad_(True)
        down = fused.group_norm_act(xf, gamma[:96], beta[:96], resample="down")
        (grad,) = torch.autograd.grad(down, xf, dy.float())
        setting = (tile, warps, pps, pre, wide, stages)
        if pps == 64 and wide:  # the per-group kernels' loop over blocks runs more than once
            for c in (160, 96):
                nblk = fused._split(x.shape[2] * x.shape[3], x.shape[0], fused._blocks(c)[0], x.device)[1]
                assert nblk > fused._group_tiles(c, nblk)[2]["BLOCK_B"], (c, nblk)
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
def test_derived_weights_follow_a_second_prepare_and_are_not_copied(monkeypatch):
    """The fused path's derived weights (stacked embeddings, W^T of the skip convs, folded up
    convs, padded input/output convs) are dropped by a second ``prepare`` (another dtype here)
    and not carried by a deepcopy; both runs match the exact model."""
    from adm_cli import layers

    cfg = TINY["new-order"]
    ref = exact(cfg)
    dev = _kernel_device()
    ours = fast.prepare(copy.deepcopy(ref), device=dev, dtype="float32", fused_kernels=True)
    x, t, kw = inputs(cfg, n=1)  # (what is kept does not depend on the batch; batches: test_fused_unet_matches_exact)
    with torch.no_grad():
        want = ref(x, t, **kw)
        assert rel_norm(want, ours(x.to(dev), t.to(dev), **kw).cpu()) <= 1e-5
        kept = [m for m in ours.modules() if m.__dict__.get("_derived")]
        assert len(kept) >= 4  # the model (embeddings), skip convs, up conv, input and output convs
        twin = copy.deepcopy(ours)
        assert not any(m.__dict__.get("_derived") for m in twin.modules())
        fast.prepare(ours, device=dev, dtype="float16", fused_kernels=True)
        assert not any(m.__dict__.get("_derived") for m in ours.modules())
        # (a float32 value kept from the first run would meet float16 activations: refused or off)
        assert rel_norm(want, ours(x.to(dev), t.to(dev), **kw).cpu()) <= 4e-3
        assert rel_norm(want, twin(x.to(dev), t.to(dev), **kw).cpu()) <= 1e-5
    assert "_derived" not in "".join(ours.state_dict())
    assert layers.version_key(ours.out[2].weight)[1] == torch.float16


def test_block_embeddings_are_each_blocks_projection_and_follow_the_weights():
    """One GEMM over the stacked projections gives every block its emb_layers(emb); a block whose
    projection is written in place gets the new values (no stale stack)."""
    from adm_cli.layers import ResBlock, block_embeddings

    model = exact(TINY["new-order"])
    emb = torch.randn(3, model.time_embed[2].out_features)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    with torch.no_grad():
        table = block_embeddings(model, emb)
        for b in blocks:
            assert rel_norm(b.emb_layers(emb), table.of(b)) <= 1e-6
        blocks[1].emb_layers[1].bias.add_(1.0)
        again = block_embeddings(model, emb)
        assert rel_norm(blocks[1].emb_layers(emb), again.of(blocks[1])) <= 1e-6
        assert rel_norm(table.of(blocks[1]) + 1.0, again.of(blocks[1])) <= 1e-6
    assert not any("emb_stack" in k or "_derived" in k for k in model.state_dict())


@needs_kernels
@pytest.mark.parametrize("c1,c2,co,dtype", [(64, 32, 32, torch.float32), (96, None, 160, torch.float32),
                                            (128, 128, 64, torch.float16), (64, 96, 48, torch.bfloat16),
                                            (200, 56, 136, torch.float32)])  # channels off every tile
@pytest.mark.parametrize("one_loop", [False, True])
def test_skip_add_matches_float64(c1, c2, co, dtype, one_loop, monkeypatch):
    """h + bias + W [x; x2] in one GEMM vs float64; rows not a multiple of the row tile; the two
    parts of the decoder's cat in one K loop or one loop each."""
    monkeypatch.setattr(fused, "_GEMM_ONE_LOOP", one_loop)
    dev = _kernel_device()
    g = torch.Generator().manual_seed(7)
    cin = c1 + (c2 or 0)
    conv = torch.nn.Conv2d(cin, co, 1).to(memory_format=torch.channels_last)
    x = nhwc(torch.randn(3, c1, 7, 9, generator=g))
    x2 = None if c2 is None else nhwc(torch.randn(3, c2, 7, 9, generator=g))
    h = nhwc(torch.randn(3, co, 7, 9, generator=g))
    bias = torch.randn(co, generator=g)
    full = x if x2 is None else torch.cat([x, x2], 1)
    want = h.double() + bias.double()[:, None, None] + F.conv2d(full.double(), conv.weight.double())
    conv = conv.to(dtype)
    put = lambda t: None if t is None else t.to(dev, dtype)  # noqa: E731
    got = fused.skip_add(put(h), put(x), put(x2), fused.skip_weight(conv).to(dev), bias.to(dev))
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    # float32: the GEMM's own rounding; half: the inputs' and the output's rounding (vs float64 of
    # the unrounded inputs)
    assert rel_norm(want, got.double().cpu()) <= {torch.float32: 1e-6, torch.float16: 2e-3,
                                                  torch.bfloat16: 1.5e-2}[dtype]
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused.skip_add(put(h)[:, :, :3], put(x), put(x2), fused.skip_weight(conv).to(dev), bias.to(dev))
    other = torch.float16 if dtype != torch.float16 else torch.float32
    with pytest.raises(ValueError, match="one dtype"):
        fused.skip_add(put(h), put(x).to(other), put(x2), fused.skip_weight(conv).to(dev), bias.to(dev))
    # a transposed view of the weight (not the contiguous W^T) gives the same result, not garbage
    strided = conv.weight[:, :, 0, 0].t().to(dev)
    assert rel_norm(got.double().cpu(), fused.skip_add(put(h), put(x), put(x2), strided, bias.to(dev)).double().cpu()) \
        <= 1e-12


def test_skip_add_stages_follow_the_tiles(monkeypatch):
    """The pipeline stages skip_add asks for are the tiles' own, capped by the GPU's shared memory
    (one stage's worth spare), for whatever tiles are set when it launches: a benchmark that sets
    other tiles in the same process gets their stages, not the first call's."""
    import types

    props = {0: types.SimpleNamespace(shared_memory_per_block_optin=227 * 1024),  # sm90
             1: types.SimpleNamespace(shared_memory_per_block_optin=99 * 1024)}  # sm86/sm89
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    fused._stages_that_fit.cache_clear()
    try:
        for tiles, want in (((128, 128, 64, 3), (3, 2)), ((128, 64, 64, 4), (4, 3)), ((256, 128, 64, 4), (3, 2)),
                            ((128, 128, 64, 6), (6, 2))):
            for name, v in zip(("_GEMM_M", "_GEMM_N", "_GEMM_K", "_GEMM_STAGES"), tiles):
                monkeypatch.setattr(fused, name, v)
            assert (fused._gemm_stages(0), fused._gemm_stages(1)) == want, tiles
    finally:
        fused._stages_that_fit.cache_clear()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_add_gives_its_outputs_statistics_to_the_next_norm(dtype, monkeypatch):
    """Inside ``shared_statistics`` skip_add's epilogue takes its output's statistics per row
    tile, where the tile divides the pixels per sample: the next norm over that output reads
    nothing and matches the float64 norm of the stored output (several tiles per sample, 96
    channels: two channel tiles, the second partly masked). Where the tile does not divide them
    (7x9 pixels) the norm takes the statistics itself."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(9)
    c1, c2, co = 48, 32, 96
    conv = torch.nn.Conv2d(c1 + c2, co, 1).to(memory_format=torch.channels_last).to(dtype)
    gamma, beta = (1 + 0.2 * torch.randn(co, generator=g)).to(dev), (0.1 * torch.randn(co, generator=g)).to(dev)
    reads = _stats_reads(monkeypatch)
    for hw, kept in (((16, 24), True), ((7, 9), False)):
        mk = lambda c: nhwc(torch.randn(2, c, *hw, generator=g) * 0.5 + 1.0).to(dev, dtype)  # noqa: E731
        x, x2, h = mk(c1), mk(c2), mk(co)
        bias = torch.randn(co, generator=g).to(dev)
        reads.clear()
        with torch.no_grad(), fused.shared_statistics():
            y = fused.skip_add(h, x, x2, fused.skip_weight(conv).to(dev), bias)
            got = fused.group_norm_act(y, gamma, beta)
        assert reads == ([] if kept else [y.numel()])
        want = fused.reference_group_norm_act(y, gamma, beta)
        assert rel_norm(want, got.double()) <= BOUNDS[dtype]
        with torch.no_grad():  # outside the scope, no statistics kept: the same y, the same norm
            y2 = fused.skip_add(h, x, x2, fused.skip_weight(conv).to(dev), bias)
            assert torch.equal(y, y2) and getattr(y2, fused._KEPT, None) is None
            assert rel_norm(want, fused.group_norm_act(y2, gamma, beta).double()) <= BOUNDS[dtype]


@needs_kernels
@pytest.mark.parametrize("c,co,hw,dtype", [(3, 64, (16, 24), torch.float32), (6, 96, (7, 9), torch.float32),
                                           (3, 192, (16, 8), torch.bfloat16), (3, 32, (8, 32), torch.float16)])
def test_direct_input_conv_matches_the_conv_and_gives_its_statistics(c, co, hw, dtype, monkeypatch):
    """``conv_in_direct`` (the receptive field of 3 or 6 channels gathered as one GEMM row) is
    the 'same'-padded 3x3 conv plus bias of the float64 conv over the same rounded inputs and
    weights, rounded once, for an NCHW or a channels_last input, odd sizes, 192 outputs (three
    channel tiles of 64). Inside ``shared_statistics`` its epilogue's statistics (128-row tiles
    dividing the pixels per sample) serve the next norm, which reads nothing; outside, or where
    the tile does not divide them (7x9), none are kept."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(14)
    conv = torch.nn.Conv2d(c, co, 3, padding=1)
    with torch.no_grad():
        conv.bias.normal_(0.0, 0.5, generator=g)
    conv = conv.to(dtype)
    x = torch.randn(2, c, *hw, generator=g).to(dtype)
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    matrix, bias = (t.to(dev) for t in fused.in_matrix(conv))
    gamma, beta = (1 + 0.2 * torch.randn(co, generator=g)).to(dev), (0.1 * torch.randn(co, generator=g)).to(dev)
    reads = _stats_reads(monkeypatch)
    tiled = (hw[0] * hw[1]) % 128 == 0
    for xin in (x, nhwc(x)):
        reads.clear()
        with torch.no_grad(), fused.shared_statistics():
            y = fused.conv_in_direct(xin.to(dev), matrix, bias, (3, 3))
            got = fused.group_norm_act(y, gamma, beta)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        # (one rounding to dtype: at most half its eps relative per element; float32's sum order)
        assert rel_norm(want, y.double().cpu()) <= max(torch.finfo(dtype).eps / 2, 1e-6)
        assert reads == ([] if tiled else [y.numel()])
        assert rel_norm(fused.reference_group_norm_act(y, gamma, beta), got.double()) <= BOUNDS[dtype]
        with torch.no_grad():
            y2 = fused.conv_in_direct(xin.to(dev), matrix, bias, (3, 3))
        assert torch.equal(y, y2) and getattr(y2, fused._KEPT, None) is None
    with pytest.raises(ValueError, match="do not fit"):
        fused.conv_in_direct(torch.randn(2, 4 * c, *hw).to(dev, dtype), matrix, bias, (3, 3))
    for other in (torch.nn.Conv2d(c, co, 3), torch.nn.Conv2d(c, co, 3, padding=1, stride=2)):
        with pytest.raises(ValueError, match="'same' padding"):
            fused.in_matrix(other)


@needs_kernels
@pytest.mark.parametrize("c,hw,resample,dtype,geometry", [
    (96, (20, 12), None, torch.float32, None), (64, (6, 5), "up", torch.float32, None),
    (256, (8, 20), "down", torch.bfloat16, None), (64, (10, 12), None, torch.float16, None),
    (96, (20, 12), None, torch.float32, (16, 4096, 4)),  # 32-row blocks, one tile each: 8 blocks, the last short
    (256, (8, 20), "down", torch.bfloat16, (16, 16384, 8)),  # 64-row tiles, a block each
    (96, (20, 12), None, torch.float32, (128, 4096, 4, 3)),  # the loop pipelined (fused._LOOP_STAGES)
    (64, (6, 5), "up", torch.float16, (128, 4096, 4, 2))])
def test_residual_add_gives_its_outputs_statistics_to_the_next_norm(c, hw, resample, dtype, geometry, monkeypatch):
    """Inside ``shared_statistics`` the closing residual add also takes its output's statistics
    (blocks of 128 rows, the last one short or the only one, or another geometry of ops.py's
    --add-stats, or the loop pipelined; resampled skips; a mean 20 standard deviations off zero,
    for the shifted sums):
    the same y as outside, and the next norm over it reads nothing and matches the float64 norm
    of the stored y."""
    dev = _kernel_device()
    if geometry:
        for name, v in zip(("_RESIDUAL_STATS_ROWS", "_RESIDUAL_STATS_TILE", "_RESIDUAL_STATS_WARPS", "_LOOP_STAGES"),
                           geometry):
            monkeypatch.setattr(fused, name, v)
    g = torch.Generator().manual_seed(12)
    rhw = {None: hw, "up": (hw[0] // 2, hw[1] // 2), "down": (2 * hw[0], 2 * hw[1])}[resample] if resample != "up" \
        else hw
    r = nhwc(torch.randn(2, c, *rhw, generator=g) + 10.0).to(dev, dtype)
    ohw = {None: rhw, "up": (2 * rhw[0], 2 * rhw[1]), "down": (rhw[0] // 2, rhw[1] // 2)}[resample]
    x = nhwc(torch.randn(2, c, *ohw, generator=g) * 0.5 + 10.0).to(dev, dtype)
    bias = torch.randn(c, generator=g).to(dev)
    gamma, beta = (1 + 0.2 * torch.randn(c, generator=g)).to(dev), (0.1 * torch.randn(c, generator=g)).to(dev)
    reads = _stats_reads(monkeypatch)
    with torch.no_grad():
        plain = fused.add_bias(x, r, bias, resample=resample)
        with fused.shared_statistics():
            y = fused.add_bias(x, r, bias, resample=resample)
            reads.clear()
            if geometry:  # (the blocks' rows as set: a tile each, or a loop over 128 rows)
                rows = max(fused._tile_shape(c, geometry[1])[0], geometry[0])
                assert getattr(y, fused._KEPT)[1][0].shape[2] == -(-ohw[0] * ohw[1] // rows)
            got = fused.group_norm_act(y, gamma, beta)
            assert reads == []
            off = fused.add_bias(x, r, bias, resample=resample, stats=False)
            assert getattr(off, fused._KEPT, None) is None
    assert torch.equal(y, plain) and torch.equal(off, plain)
    assert rel_norm(fused.reference_group_norm_act(y, gamma, beta), got.double()) <= BOUNDS[dtype]


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (4, 4)])
def test_conv_up_is_the_conv_of_the_upsampled_input(size):
    """A 3x3 conv of the nearest 2x upsample equals the stride-2 transposed conv with the folded
    4x4 kernel (plain PyTorch, float64: the taps' sums are the only difference)."""
    g = torch.Generator().manual_seed(8)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1, bias=False).double()
    x = torch.randn(2, 16, *size, generator=g, dtype=torch.float64)
    want = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    got = fused.conv_up(x, fused.up_weight(conv))
    assert got.shape == want.shape and rel_norm(want, got) <= 1e-12
    cl = conv.to(memory_format=torch.channels_last)
    assert fused.up_weight(cl).is_contiguous(memory_format=torch.channels_last)  # cuDNN's fast NHWC kernels
    with pytest.raises(ValueError, match="3x3 conv"):
        fused.up_weight(torch.nn.Conv2d(16, 24, 3, padding=1, stride=2))


@pytest.mark.parametrize("cin,bias", [(3, True), (6, True), (3, False), (7, True)])
def test_padded_input_and_output_convs(cin, bias):
    """The input conv widened to a multiple of 8 channels with its bias as weights of a constant
    channel (zero padding at the borders must not reach it), and the output conv padded to 8
    outputs, equal to the plain convs with their biases."""
    g = torch.Generator().manual_seed(9)
    conv = torch.nn.Conv2d(cin, 32, 3, padding=1, bias=bias).double()
    x = torch.randn(2, cin, 6, 5, generator=g, dtype=torch.float64)
    w = fused.in_weight(conv)
    assert w.shape[1] % 8 == 0 and w.shape[1] > cin
    assert rel_norm(conv(x), fused.conv_in(x, w, conv.padding)) <= 1e-12
    head = torch.nn.Conv2d(32, cin, 3, padding=1, bias=bias).double()
    a = torch.randn(2, 32, 6, 5, generator=g, dtype=torch.float64)
    w8, b8 = fused.out_weight(head)
    assert w8.shape[0] % 8 == 0 and (b8 is None) == (not bias)
    got = fused.conv_out(a, w8, b8, cin, head.padding)
    assert got.shape == (2, cin, 6, 5) and rel_norm(head(a), got) <= 1e-12


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
    split, ups, cublas = [], [], []
    monkeypatch.setattr(fused, "skip_add", lambda h, x, x2, *a, _f=fused.skip_add, **k: split.append(x2 is not None)
                        or _f(h, x, x2, *a, **k))
    monkeypatch.setattr(fused, "conv1x1_cat", lambda *a, _f=fused.conv1x1_cat: cublas.append(1) or _f(*a))
    monkeypatch.setattr(fused, "conv_up", lambda *a, _f=fused.conv_up: ups.append(1) or _f(*a))
    x, t, kw = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, **kw)
        got = ours(x.to(dev), t.to(dev), **{k: v.to(dev) for k, v in kw.items()}).cpu()
    # every decoder block read h and the skip in place: in one GEMM with its closing add (half
    # precision, or anything in the interpreter), else (float32 on a GPU) in two cuBLAS GEMMs
    if dtype != "float32" or fused.interpreted():
        assert split.count(True) == len(ours.output_blocks) and not cublas
    else:
        assert len(cublas) == len(ours.output_blocks) and not split
    assert len(ups) == sum(getattr(b, "resample", None) == "up" for b in ours.modules())
    assert got.dtype == torch.float32
    assert rel_norm(want, got) <= bound


@needs_kernels
@pytest.mark.parametrize("family", ["new-order", "upsampler"])
def test_fused_unet_shares_statistics(family, monkeypatch):
    """With ``layers.SHARED_STATS`` the statistics kernel reads every skip connection once per
    forward (for the encoder's next norm) instead of twice, the decoder's norms over cat([h,
    skip], 1) reading h only; and (``layers.SKIP_STATS``, ``IN_STATS``, ``RESIDUAL_STATS``) not at
    all the outputs of skip_add, of the direct input conv and of the closing residual adds, whose
    statistics come out of those ops. Same output within float32 rounding."""
    from adm_cli import layers

    cfg = TINY[family]
    ours = fast.prepare(exact(cfg), device=_kernel_device(), dtype="float32", fused_kernels=True)
    x, t, kw = inputs(cfg, n=1)  # (the reads are counted per image; batches: test_fused_unet_matches_exact)
    x, t, kw = x.to(_kernel_device()), t.to(_kernel_device()), {k: v.to(_kernel_device()) for k, v in kw.items()}
    skips = []
    for block in ours.input_blocks[1:]:
        block.register_forward_hook(lambda m, args, out: skips.append(out.numel()))
    first = ours.input_blocks[0][0]
    conv_in = x.shape[0] * first.out_channels * x.shape[2] * x.shape[3]  # the input conv's output
    epilogue = {"skip_add": [], "conv_in_direct": [], "add_bias": []}  # outputs that came with their statistics

    def recorded(name, _f):
        def op(*a, **k):
            y = _f(*a, **k)
            if getattr(y, fused._KEPT, None) is not None:
                epilogue[name].append(y.numel())
            return y
        return op

    for name in epilogue:
        monkeypatch.setattr(fused, name, recorded(name, getattr(fused, name)))
    reads = _stats_reads(monkeypatch)
    outs = {}
    settings = ((False,) * 4, (True, False, False, False), (True, True, False, False), (True, True, True, False),
                (True,) * 4)
    for setting in settings:
        for switch, on in zip(("SHARED_STATS", "SKIP_STATS", "IN_STATS", "RESIDUAL_STATS"), setting):
            monkeypatch.setattr(layers, switch, on)
        for kept in (reads, skips, *epilogue.values()):
            kept.clear()
        with torch.no_grad():
            outs[setting] = ours(x, t, **kw).cpu()
        outs[setting, "reads"] = sum(reads)
        outs[setting, "kept"] = {name: sum(v) for name, v in epilogue.items()}
    assert len(skips) == len(ours.input_blocks) - 1
    none, shared, skip, inp, residual = (outs[s, "reads"] for s in settings)
    assert shared == none - sum(skips) - conv_in and sum(skips) + conv_in > 0.1 * none
    # each output that came with its statistics is read by one norm, which now reads nothing
    assert outs[settings[1], "kept"] == {"skip_add": 0, "conv_in_direct": 0, "add_bias": 0}
    kept_skip, kept_in, kept_add = outs[settings[4], "kept"].values()
    assert outs[settings[2], "kept"] == {"skip_add": kept_skip, "conv_in_direct": 0, "add_bias": 0}
    assert outs[settings[3], "kept"] == {"skip_add": kept_skip, "conv_in_direct": kept_in, "add_bias": 0}
    assert kept_skip and skip == shared - kept_skip
    assert kept_in == conv_in and inp == skip - kept_in
    assert kept_add and residual == inp - kept_add
    for s in settings[1:]:
        assert rel_norm(outs[settings[0]], outs[s]) <= 1e-6, s


@needs_kernels
@pytest.mark.parametrize("switch", ["FUSED_CONCAT", "FUSED_SKIP", "UP_CONV", "PAD_IO", "SHARED_STATS", "DIRECT_IN"])
def test_fused_unet_with_a_part_switched_back(switch, monkeypatch):
    """Each of layers' switches (bench.py --concat / --set) back to the plainer form: same output.
    FUSED_CONCAT False: torch.cat again; FUSED_SKIP False: cuBLAS GEMMs and a separate add;
    UP_CONV "plain": upsampled norm output and a 3x3 conv; PAD_IO False: cuDNN's own input and
    output convs; SHARED_STATS False: every norm takes its own statistics; DIRECT_IN False:
    cuDNN's input conv over the padded input."""
    from adm_cli import layers

    cfg = TINY["new-order"]  # (BigGAN up/down blocks, decoder skip convs, 6 output channels)
    ref = exact(cfg)
    ours = fast.prepare(copy.deepcopy(ref), device=_kernel_device(), dtype="float32", fused_kernels=True)
    monkeypatch.setattr(layers, switch, "plain" if switch == "UP_CONV" else False)
    banned = {"FUSED_CONCAT": ("conv1x1_cat", "the split skip conv"), "FUSED_SKIP": ("skip_add", "the skip GEMM"),
              "UP_CONV": ("conv_up", "the transposed conv"), "PAD_IO": ("conv_in", "the padded input conv"),
              "DIRECT_IN": ("conv_in_direct", "the direct input conv")}
    if switch == "SHARED_STATS":
        monkeypatch.setattr(fused, "_statistics_of", lambda *a: pytest.fail("kept statistics were used"))
    else:
        name, what = banned[switch]
        monkeypatch.setattr(fused, name, lambda *a, **k: pytest.fail(f"{what} ran"))
    if switch == "PAD_IO":
        monkeypatch.setattr(fused, "conv_out", lambda *a: pytest.fail("the padded output conv ran"))
        monkeypatch.setattr(fused, "conv_in_direct", lambda *a, **k: pytest.fail("the direct input conv ran"))
    if switch == "FUSED_CONCAT":  # the skip GEMM then reads the concatenation (x2 None)
        monkeypatch.setattr(fused, "skip_add", lambda h, x, x2, *a, _f=fused.skip_add, **k:
                            _f(h, x, x2, *a, **k) if x2 is None else pytest.fail("the skip GEMM read x2"))
    x, t, kw = inputs(cfg, n=1)  # (which ops run does not depend on the batch)
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


def _norm_launches(y, gamma, beta, **kw):
    """``group_norm_act(y, ...)`` and the names of the kernels it launched."""
    launched = []
    real, fused._launch = fused._launch, lambda name, *a, **k: launched.append(name) or real(name, *a, **k)
    try:
        return fused.group_norm_act(y, gamma, beta, **kw), launched
    finally:
        fused._launch = real


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_group_norm_act_large(dtype):
    """Real sizes on a GPU: the 512x512 model's first level (128 channels, 4 per group) and a
    768-channel level of the 64x64 model (24 per group, padded to 1,024 lanes); the residual
    add's statistics at the 256x256 model's first level; each with the row loops plain and
    pipelined (``fused._LOOP_STAGES``, as benchmarks/gpu_session.sh times them)."""
    shipped_stages = fused._LOOP_STAGES
    for shape, stages in itertools.product(((4, 128, 256, 256), (16, 768, 8, 8)), (shipped_stages, 2, 3)):
        try:
            fused._LOOP_STAGES = stages
            fwd, bwd = _run_case("cuda", *shape, dtype, "c", True, True, 0.5, "down")
        finally:
            fused._LOOP_STAGES = shipped_stages
        assert fwd <= BOUNDS[dtype] and bwd <= 2 * BOUNDS[dtype], (shape, stages, fwd, bwd)
    # the closing residual add with its statistics loop at the 256x256 model's level 0 (and an
    # up block into it), then the norm over its output, which reads nothing more
    # (at the shipped geometry, a loop over 128-row blocks, plain and pipelined, and at two of one
    # tile per program that benchmarks/gpu_session.sh times: 16 rows at 4 warps, 32 at 8)
    g = torch.Generator().manual_seed(13)
    gamma, beta = torch.ones(256, device="cuda"), torch.zeros(256, device="cuda")
    names = ("_RESIDUAL_STATS_ROWS", "_RESIDUAL_STATS_TILE", "_RESIDUAL_STATS_WARPS", "_LOOP_STAGES")
    shipped = tuple(getattr(fused, a) for a in names)
    for rsize, resample in ((256, None), (128, "up")):
        x = nhwc(torch.randn(2, 256, 256, 256, generator=g) + 3.0).cuda().to(dtype)
        r = nhwc(torch.randn(2, 256, rsize, rsize, generator=g)).cuda().to(dtype)
        bias = torch.randn(256, generator=g).cuda()
        for geometry in (shipped, (*shipped[:3], 3), (16, 4096, 4, 1), (16, 8192, 8, 1)):
            try:
                for a, v in zip(names, geometry):
                    setattr(fused, a, v)
                with torch.no_grad(), fused.shared_statistics():
                    y = fused.add_bias(x, r, bias, resample=resample)
                    z, launched = _norm_launches(y, gamma, beta)
            finally:
                for a, v in zip(names, shipped):
                    setattr(fused, a, v)
            assert launched == ["finalize", "apply"], geometry
            assert torch.equal(y, fused.add_bias(x, r, bias, resample=resample, stats=False)), geometry
            assert rel_norm(fused.reference_group_norm_act(y, gamma, beta), z.double()) <= BOUNDS[dtype], geometry


GEMM_TUNABLES = ("_GEMM_M", "_GEMM_N", "_GEMM_K", "_GEMM_WARPS", "_GEMM_STAGES", "_GEMM_ONE_LOOP")


@pytest.mark.gpu
def test_gpu_skip_add_and_conv_up_large():
    """The 256x256 model's level-0 decoder skip GEMM (256 + 256 -> 256 channels, with and without
    its statistics epilogue, at the shipped tiles and each that benchmarks/gpu_session.sh times)
    and an up block's transposed conv (512 channels, 64 -> 128) at batch 2 in float16, against
    float32 math on the same rounded inputs."""
    g = torch.Generator().manual_seed(10)
    mk = lambda c, s: nhwc(torch.randn(2, c, s, s, generator=g)).cuda().half()  # noqa: E731
    x, x2, h = mk(256, 256), mk(256, 256), mk(256, 256)
    conv = torch.nn.Conv2d(512, 256, 1).cuda().half().to(memory_format=torch.channels_last)
    bias = torch.randn(256, generator=g).cuda().half()
    got = fused.skip_add(h, x, x2, fused.skip_weight(conv), bias)
    want = h.float() + bias.float()[:, None, None] + F.conv2d(torch.cat([x, x2], 1).float(), conv.weight.float())
    assert rel_norm(want, got.float()) <= 1e-3
    # the tiles benchmarks/gpu_session.sh times (one K loop over both inputs: the sixth field)
    for tile in ((128, 128, 64, 4, 3, True), (128, 128, 64, 8, 3, True), (64, 256, 64, 8, 3, True),
                 (256, 128, 64, 8, 3, True), (128, 128, 64, 8, 3, False)):
        saved = [getattr(fused, a) for a in GEMM_TUNABLES]
        try:
            for a, v in zip(GEMM_TUNABLES, tile):
                setattr(fused, a, v)
            other = fused.skip_add(h, x, x2, fused.skip_weight(conv), bias)
        finally:
            for a, v in zip(GEMM_TUNABLES, saved):
                setattr(fused, a, v)
        assert rel_norm(want, other.float()) <= 1e-3, tile
    # the same GEMM with its statistics epilogue, and the next norm over the decoder's cat of its
    # output and a skip whose statistics an earlier norm kept: no statistics kernel over either
    gamma, beta = torch.ones(512, device="cuda"), torch.zeros(512, device="cuda")
    with torch.no_grad(), fused.shared_statistics():
        fused.group_norm_act(x2, gamma[256:], beta[256:])
        y = fused.skip_add(h, x, x2, fused.skip_weight(conv), bias)
        z, launched = _norm_launches(y, gamma, beta, x2=x2)
    assert torch.equal(y, got) and launched == ["finalize", "apply"]
    assert rel_norm(fused.reference_group_norm_act(y, gamma, beta, x2=x2), z.double()) <= 1.5e-3
    up = torch.nn.Conv2d(512, 512, 3, padding=1, bias=False).cuda().half().to(memory_format=torch.channels_last)
    a = mk(512, 64)
    want = F.conv2d(F.interpolate(a.float(), scale_factor=2, mode="nearest"), up.weight.float(), padding=1)
    got = fused.conv_up(a, fused.up_weight(up))
    assert got.is_contiguous(memory_format=torch.channels_last) and rel_norm(want, got.float()) <= 2e-3


@pytest.mark.gpu
def test_gpu_direct_input_conv_large():
    """The direct input conv at real sizes in bfloat16 (the 256x256 model's 3 -> 256 channels, the
    upsampler's 6 -> 192 at batch 2): the 'same'-padded conv of the same rounded inputs and
    weights in float32, and with its statistics the first norm launches no statistics kernel."""
    g = torch.Generator().manual_seed(15)
    for c, co in ((3, 256), (6, 192)):
        conv = torch.nn.Conv2d(c, co, 3, padding=1).cuda().bfloat16()
        x = nhwc(torch.randn(2, c, 256, 256, generator=g)).cuda().bfloat16()
        want = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1)
        matrix, bias = fused.in_matrix(conv)
        gamma, beta = torch.ones(co, device="cuda"), torch.zeros(co, device="cuda")
        with torch.no_grad(), fused.shared_statistics():
            y = fused.conv_in_direct(x, matrix, bias, (3, 3))
            z, launched = _norm_launches(y, gamma, beta)
        assert rel_norm(want, y.float()) <= 4e-3 and launched == ["finalize", "apply"]
        assert rel_norm(fused.reference_group_norm_act(y, gamma, beta), z.double()) <= 1e-2


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
import multiprocessing
jobs = []
def comp(fn, sig, const, warps=4, stages=3, aligned=False):
    # queued, compiled below on every core; aligned: also as launched at real sizes, where
    # Triton's launcher marks every pointer (16-byte aligned) and every integer divisible by 16
    # (the loads vectorize, the GEMMs' loops pipeline)
    jobs.extend((fn.__name__, sig, const, warps, stages, at) for at in (False, True)[:1 + aligned])
def work(job):
    name, sig, const, warps, stages, aligned = job
    fn = getattr(k, name)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig} if aligned else {}
    sig = dict(sig, **{c: "constexpr" for c in const})
    done = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return name, const, aligned, "cp.async" in done.asm["ptx"]
dt, i, f = "*fp16", "i32", "*fp32"
geo = dict(HW_IN=i, HW_OUT=i, W_IN=i, W_OUT=i, C=i)
stats_sig = dict(X=dt, X2=dt, IB=dt, IB_SN=i, PART=f, HW=i, C=i, C1=i, RPP=i)
for ib, two, pre in itertools.product((True, False), repeat=3):
    comp(k.stats, stats_sig, dict(HAS_IB=ib, TWO=two, PREFETCH=pre, STAGES=1, BLOCK_R=32, BLOCK_C=128))
# the row loops' pipelined form (fused._LOOP_STAGES), aligned as launched: asynchronous copies
# at 2 or more stages, none at 1
for two, stages in ((False, 1), (False, 3), (True, 2)):
    comp(k.stats, stats_sig, dict(HAS_IB=False, TWO=two, PREFETCH=False, STAGES=stages, BLOCK_R=16, BLOCK_C=256),
         aligned=True)
comp(k.bwd_finalize, dict(PART=f, M=f, NBLK=i, HW=i, C=i, CPG=i, RPP=i, inv_count="fp32"),
     dict(BLOCK_B=16, GPP=32, BLOCK_G=4))
for ib, ss, grad, split in itertools.product((True, False), repeat=4):
    for tiles, warps in ((dict(BLOCK_B=16, GPP=32, BLOCK_G=4), 4), (dict(BLOCK_B=256, GPP=4, BLOCK_G=8), 8)):  # (wide)
        comp(k.finalize, dict(PART=f, PART2=f, GAMMA=f, BETA=f, IB=dt, IB_SN=i, SCALE=f, SHIFT=f, SS_SN=i, AFF=f,
                              NBLK=i, NBLK2=i, HW=i, C=i, C1=i, CPG=i, RPP=i, RPP2=i, eps="fp32"),
             dict(HAS_IB=ib, HAS_SS=ss, GRAD=grad, SPLIT=split, **tiles), warps)
for act, rs in itertools.product((True, False), (0, 1, 2)):
    for two in (False, True) if rs == 0 else (False,):
        comp(k.apply, dict(X=dt, X2=dt, AFF=f, Y=dt, **geo, C1=i),
             dict(ACT=act, RESAMPLE=rs, TWO=two, BLOCK_R=32, BLOCK_C=128))
    comp(k.bwd_stats, dict(X=dt, DY=dt, AFF=f, PART=f, **geo, RPP=i),
         dict(ACT=act, RESAMPLE=rs, STAGES=3 if act and rs == 2 else 1, BLOCK_R=32, BLOCK_C=128),
         aligned=act and rs == 2)
    comp(k.bwd_apply, dict(X=dt, DY=dt, AFF=f, M=f, DX=dt, **geo),
         dict(ACT=act, RESAMPLE=rs, BLOCK_R=32, BLOCK_C=128))
    for st in (False, True):
        comp(k.residual_add, dict(X=dt, R=dt, BIAS=dt, Y=dt, PART=f, HW_OUT=i, HW_R=i, W_R=i, W_OUT=i, C=i, RPP=i),
             dict(HAS_BIAS=act, RESAMPLE=rs, STATS=st, ONE_TILE=False, STAGES=1, BLOCK_R=32, BLOCK_C=128))
    comp(k.residual_add, dict(X=dt, R=dt, BIAS=dt, Y=dt, PART=f, HW_OUT=i, HW_R=i, W_R=i, W_OUT=i, C=i, RPP=i),
         dict(HAS_BIAS=act, RESAMPLE=rs, STATS=True, ONE_TILE=True, STAGES=1, BLOCK_R=64, BLOCK_C=256),
         8)  # (--add-stats)
comp(k.residual_add, dict(X=dt, R=dt, BIAS=dt, Y=dt, PART=f, HW_OUT=i, HW_R=i, W_R=i, W_OUT=i, C=i, RPP=i),
     dict(HAS_BIAS=True, RESAMPLE=1, STATS=True, ONE_TILE=False, STAGES=3, BLOCK_R=16, BLOCK_C=256), aligned=True)
for ptr, f32 in (("*fp16", False), ("*bf16", False), ("*fp32", True)):
    for two, st, one in itertools.product((True, False), repeat=3):
        if not (one and not two):  # (aligned: the real sizes' half-precision decoder GEMM)
            comp(k.skip_add, dict(X=ptr, X2=ptr, WT=ptr, H=ptr, BIAS=ptr, Y=ptr, PART=f, M=i, C1=i, C2=i, CO=i),
                 dict(TWO=two, F32=f32, STATS=st, ONE_LOOP=one, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
                 aligned=ptr == "*fp16" and two)
    for st, (block_k, block_n) in itertools.product((True, False), ((32, 128), (64, 64))):
        comp(k.conv_in, dict(X=ptr, WK=ptr, BIAS=f, Y=ptr, PART=f, SN=i, SC=i, SH=i, SW=i, H=i, W=i, C=i, CO=i),
             dict(KH=3, KW=3, F32=f32, STATS=st, BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k))
with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
    results = pool.map(work, jobs, chunksize=1)
# there the tensor-core GEMM's loads are asynchronous copies: its loop is software-pipelined
gemms = [r for r in results if r[0] == "skip_add" and r[2]]
assert len(gemms) == 4 and all(r[3] for r in gemms), gemms
loops = [r for r in results if r[0] in ("stats", "bwd_stats", "residual_add") and r[2]]
assert len(loops) == 5 and all(r[3] == (r[1]["STAGES"] > 1) for r in loops), loops
print("compiled", len(results))
'''
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip(f"Triton {triton.__version__} has no ASTSource/GPUTarget")
    # (~2-4 minutes with a cold Triton cache on a 2-core machine, seconds with a warm one)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
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
