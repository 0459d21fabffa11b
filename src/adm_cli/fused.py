"""Fused GroupNorm kernels for the GPU fast path (Triton), on channels_last activations.

Between two convolutions an ADM residual block computes, per sample n and channel c,

    z = GroupNorm(x + b_conv) * (1 + s) + b,    y = SiLU(z)

(AdaGN, Dhariwal & Nichol section 3; without scale-shift the embedding is added to x instead).
Op by op that is a conv-bias add, the norm's two reads and one write, a scale-shift and a SiLU:
six or seven passes over a tensor that at 512x512 is 0.5 GB per 128 channels of batch 8. Here it
is three: one read for the group statistics, one read and one write for the output. Because every
factor is per (n, c), the whole chain folds into y = act(x A[n, c] + B[n, c]) with A and B
computed from the statistics in float32 (one small kernel), so the conv before it can run without
its bias (``conv_nobias``) and the block's closing ``skip + conv + bias`` is one pass too
(``add_bias``). The BigGAN-style up/down blocks resample both branches: the norm's output is
written directly at the new size and the skip is read through the resampling inside the closing
add, so no upsample or average-pool kernel runs (on an H200 those took 19 and 16 ms per two
guided 512x512 steps, and the pool's backward 18 ms more).

The decoder's blocks take cat([h, skip], 1). Its two readers are the first norm and the 1x1
skip conv, so neither needs it written: the norm kernels read channels [0, C1) from h and the
rest from the skip (``x2``), and the skip conv is two GEMMs over the channels_last pixels, the
second accumulating into the first (``conv1x1_cat``: W [h; skip] = W_h h + W_s skip). On an
H200 the concatenations took 5.8 ms of a 79 ms DDIM step at 256x256; the split GEMM costs one
extra read and write of the block's (narrower) output instead.

Those skip tensors were read once already: each is the input of the encoder's next norm. Inside
``shared_statistics`` (the fused U-Net forward) a norm keeps its input's per-block statistics on
the tensor, and the decoder's norm takes the skip's from there and reads only h, its final
per-group combination drawing on both inputs' blocks (``finalize`` with SPLIT): the skip halves
are 17.6% of what the statistics kernel reads in a 256x256 forward. There, too, ``skip_add``
and the closing residual add take their outputs' statistics on the way for the norm that reads
them next (18.5% and 20.0% more; ``benchmarks/reads.py`` counts them at full size).

Where the skip conv changes the channel count, its GEMM does the closing add as well
(``skip_add``: y = h + bias + W [x; skip] in one Triton GEMM, accumulated in float32, rounded
once): on an H100 at 256x256 that took 5.6 instead of 9.4 ms per forward. The up blocks' first
conv never sees the upsampled tensor (``conv_up``: nearest 2x upsample then a 3x3 conv is a
stride-2 transposed conv with a folded 4x4 kernel, 4 instead of 9 multiply-adds per input channel
and output pixel; 3.1 instead of 5.6 ms per forward with its norm). The network's input conv has
3 channels, which cuDNN runs slowly and PyTorch follows with a separate bias pass; ``conv_in``
pads them to 8 with the bias as weights of a constant channel (0.6 instead of 1.3 ms).

Statistics: each program sums x - K and (x - K)^2 per channel over its rows, K being its first
rows' mean (shifted sums: no E[x^2] - E[x]^2 cancellation), and the per-group totals combine the
programs' means and M2 with Chan et al.'s pairwise formula. Everything is accumulated and applied
in float32 and rounded once on store, so the output is at least as accurate as the reference's
float32-upcast GroupNorm followed by its half-precision scale-shift and SiLU.

The classifier's input gradient needs a backward: ``_NormAct.backward`` is the usual GroupNorm
gradient, dx = rstd (g - mean_G(g) - x^ mean_G(g x^)) with g = dL/dz (1 + s) gamma, again one
reading pass for the two group sums and one for dx (dL/dy gathered back through the resampling).

Triton comes with PyTorch's CUDA builds; without it (or off CUDA) nothing here is used. Set
TRITON_INTERPRET=1 to run the kernels on CPU tensors (the tests do, to check them without a GPU).
The kernels themselves are in ``_fused_kernels.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F

from .errors import KernelError

GROUPS = 32
# Launch geometry (benchmarks/kernels.py times other values): elements per program tile (rows x
# padded channels) of the elementwise kernels and of each step of the reductions, warps per
# program, reduction programs per multiprocessor, and whether the statistics kernel keeps two
# tiles' loads in flight (its PREFETCH) rather than one.
_TILE = 4096
_WARPS = 4
_PROGRAMS_PER_SM = 4
_STATS_PREFETCH = False
# Pipeline stages of the reductions' row loops (statistics, the norm backward's sums, the residual
# add's statistics loop): 1 is a plain loop, each tile's load waits for the last tile's arithmetic,
# so a program has one tile in flight (~32 KB per multiprocessor at 4 programs of 16 x 256 halves);
# N > 1 has Triton's pipeliner issue the next N - 1 tiles' loads asynchronously into shared memory
# (compiled for sm_90, Triton 3.6: cp.async, 16 KB of shared memory per program at 3 stages, 110
# registers against 96). The statistics kernel read at ~1.7 TB/s on an H200 (session 14), less
# than half its roof. Off until a GPU has timed it (benchmarks/ops.py --groups stats).
_LOOP_STAGES = 1


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Triton imports (it ships with PyTorch's CUDA wheels)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no fused kernels
        return False
    return True


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    """Kernel ``name``, its module imported on first use (so TRITON_INTERPRET can be set before,
    and importing this module never needs Triton)."""
    from . import _fused_kernels

    return getattr(_fused_kernels, name)


def _launch(name: str, grid: tuple, *args, **meta) -> None:
    """Launch kernel ``name``; a Triton failure (an unsupported GPU, a broken toolchain) becomes
    one line that says how to run without the fused kernels."""
    try:
        _kernel(name)[grid](*args, **meta)
    except Exception as exc:  # noqa: BLE001 - compile and launch errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise KernelError(f"the fused GPU kernel '{name}' failed ({type(exc).__name__}: {first}); "
                          "set ADM_FUSED=0 to run without the fused kernels") from exc


# -- layout and launch geometry ----------------------------------------------------------------
# Host time matters here: a guided 64x64 step at batch 64 makes ~150 norm calls, and on an H200
# its GPU work (52 ms) was shorter than the host's. So the geometry is computed once per shape
# (cached, keyed on the tunables too), and each op's small results come in one allocation.

def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """x as a channels_last-contiguous [N, C, H, W] tensor (a copy only if it is not one)."""
    if x.dim() != 4:
        raise ValueError(f"expected [N, C, H, W] activations, got shape {tuple(x.shape)}")
    return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(memory_format=torch.channels_last)


def _blocks(c: int) -> tuple[int, int]:
    """(rows, padded channels) of a program tile over C channels."""
    return _tile_shape(c, _TILE)


@functools.lru_cache(maxsize=None)
def _tile_shape(c: int, tile: int) -> tuple[int, int]:
    block_c = triton_next_pow2(c)
    return max(1, tile // block_c), block_c


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 2
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(hw: int, n: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, programs per sample) for a reduction over hw rows: a few programs per
    multiprocessor in all, enough to fill the chip."""
    return _split_for(hw, n, block_r, device, _PROGRAMS_PER_SM)


@functools.lru_cache(maxsize=4096)
def _split_for(hw: int, n: int, block_r: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    sms = _multiprocessors(device.index if device.type == "cuda" else None)
    want = max(1, -(-(per_sm * sms) // n))
    nblk = max(1, min(-(-hw // block_r), want))
    rpp = -(-(-(-hw // nblk)) // block_r) * block_r
    return rpp, -(-hw // rpp)


def _row_vec(t: torch.Tensor | None, n: int, c: int) -> tuple[torch.Tensor | None, int]:
    """A per-channel ([C]) or per-sample-and-channel ([N, C], unit channel stride) vector, and
    its stride between samples (0 for [C])."""
    if t is None:
        return None, 0
    if t.dim() == 1:
        return t.contiguous(), 0
    t = t.reshape(n, c)
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


# -- forward statistics, the autograd function, and the public ops ---------------------------

_RESAMPLE = {None: 0, "up": 1, "down": 2}


def _resampled(h: int, w: int, resample: str | None) -> tuple[int, int]:
    if resample is None:
        return h, w
    if resample == "up":
        return 2 * h, 2 * w
    if resample == "down":
        if h % 2 or w % 2:
            raise ValueError(f"fused 2x2 average pool needs even sizes, got {h}x{w}")
        return h // 2, w // 2
    raise ValueError(f"unknown resample {resample!r} (None, 'up' or 'down')")


def _statistics(x: torch.Tensor, x2: torch.Tensor | None = None,
                in_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """The per-block statistics of x + in_bias (or of cat([x, x2], 1)): PART, float32
    [2, N, NBLK, C] (each block's per-channel mean and M2), rows per block, NBLK."""
    n, c1, h, w = x.shape
    c = c1 + (x2.shape[1] if x2 is not None else 0)
    hw = h * w
    block_r, block_c = _blocks(c)
    rpp, nblk = _split(hw, n, block_r, x.device)
    part = torch.empty((2, n, nblk, c), dtype=torch.float32, device=x.device)  # per-block means, M2
    ib, ib_sn = _row_vec(in_bias, n, c)
    _launch("stats", (nblk, n), x, x2 if x2 is not None else x, ib if ib is not None else x, ib_sn, part,
            hw, c, c1, rpp, HAS_IB=ib is not None, TWO=x2 is not None, PREFETCH=_STATS_PREFETCH, STAGES=_LOOP_STAGES,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS)
    return part, rpp, nblk


# Statistics kept for a second reader. In the U-Net every decoder block's first norm reads
# cat([h, skip], 1), and its skip was read once already, by the norm of the encoder block after
# the one that made it; the decoder's skip halves are 17.6% of the bytes that the statistics
# kernel reads in a 256x256 forward. Inside ``shared_statistics`` a norm without an input bias
# keeps its input's PART on the tensor (freed with it: ~1-2 MB, up to 17 MB for a 256x256 output
# of ``skip_add`` at batch 16, whose blocks are its 128-row tiles) and a later norm over
# the same tensor reuses it. Only inside: there no tensor is written in place between its two
# readers (every op of the fused forward writes a fresh output), which outside nobody promises.
_SCOPE = threading.local()
_KEPT = "_adm_statistics"


@contextlib.contextmanager
def shared_statistics():
    """The scope (one forward of a network on the fused path) in which a tensor's statistics,
    once taken by a norm, are reused by the later norms that read it (see ``_SCOPE``)."""
    previous = getattr(_SCOPE, "token", None)
    _SCOPE.token = object()  # kept statistics from another scope never match
    try:
        yield
    finally:
        _SCOPE.token = previous


def _keep(x: torch.Tensor, token: object, stats: tuple[torch.Tensor, int, int]) -> None:
    """Keep x's statistics (PART, rows per block, NBLK) on x for the scope ``token``."""
    setattr(x, _KEPT, (token, stats))


def _statistics_of(x: torch.Tensor, token: object) -> tuple[torch.Tensor, int, int]:
    """``_statistics(x)``, kept on x within the scope ``token`` (taken at most once there)."""
    kept = getattr(x, _KEPT, None)
    if kept is not None and kept[0] is token:
        return kept[1]
    stats = _statistics(x)
    _keep(x, token, stats)
    return stats


def _part_to_keep(stats: bool, n: int, hw: int, rows: int, c: int,
                  device: torch.device) -> tuple[object, torch.Tensor | None]:
    """For an op that takes its output's statistics per ``rows``-row block on the way: inside
    ``shared_statistics`` (and when ``stats``), the scope's token and an empty PART for them,
    [2, N, ceil(hw / rows), C] float32; else (None, None)."""
    token = getattr(_SCOPE, "token", None) if stats else None
    if token is None:
        return None, None
    return token, torch.empty((2, n, -(-hw // rows), c), dtype=torch.float32, device=device)


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            in_bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
            x2: torch.Tensor | None = None, grad: bool = False) -> torch.Tensor:
    """AFF, float32 [2, N, C]: A and B (y = x A + B) for a channels_last x (or cat([x, x2], 1),
    see ``group_norm_act``); with ``grad``, [5, N, C]: also W = gamma (1 + s), RS = rstd and XO
    (x^ = x RS + XO), what the backward needs."""
    n, c1, h, w = x.shape
    c = c1 + (x2.shape[1] if x2 is not None else 0)
    if c % GROUPS:
        raise ValueError(f"GroupNorm over {GROUPS} groups needs a multiple of {GROUPS} channels, got {c}")
    token = getattr(_SCOPE, "token", None)
    second = None
    if token is not None and in_bias is None:  # each input's own statistics, kept for a later reader
        part, rpp, nblk = _statistics_of(x, token)
        if x2 is not None:
            second = _statistics_of(x2, token)
    else:
        part, rpp, nblk = _statistics(x, x2, in_bias)
    ib, ib_sn = _row_vec(in_bias, n, c)
    aff = torch.empty((5 if grad else 2, n, c), dtype=torch.float32, device=x.device)
    sc, ss_sn = _row_vec(scale, n, c)
    sh, sh_sn = _row_vec(shift, n, c)
    if sc is not None and ss_sn != sh_sn:
        sc, sh = sc.contiguous(), sh.contiguous()
        ss_sn = c
    part2, rpp2, nblk2 = second if second is not None else (part, rpp, nblk)
    cpg, grid, tiles = _group_tiles(c, max(nblk, nblk2))
    _launch("finalize", (n, grid), part, part2, weight, bias, ib if ib is not None else part, ib_sn,
            sc if sc is not None else part, sh if sh is not None else part, ss_sn, aff,
            nblk, nblk2, h * w, c, c1 if second is not None else c, cpg, rpp, rpp2, float(eps),
            HAS_IB=ib is not None, HAS_SS=sc is not None, GRAD=grad, SPLIT=second is not None, **tiles)
    return aff


# Above this many statistics blocks per sample (the kept statistics of 128-row blocks: 512 per
# sample at 256x256, 2,048 at 512x512) ``finalize`` runs wide: tiles of ~32 channels (4x the
# programs) and 8,192 partial results per step (4x as many, 8 warps; ~165-195 registers compiled
# for sm_90, no spills), so that a program makes a few dependent round trips to memory, not the
# 256 that 2,048 blocks in steps of 16 would take.
_WIDE_FINALIZE_BLOCKS = 64


def _group_tiles(c: int, nblk: int = 0) -> tuple[int, int, dict]:
    """Channels per group, programs per sample and the tile sizes of the per-group kernels
    (finalize, bwd_finalize) over ``nblk`` blocks per sample: GPP groups per program, tiles of
    ~128 channels (~32 when wide)."""
    return _group_tiles_for(c, _WARPS, nblk > _WIDE_FINALIZE_BLOCKS)


@functools.lru_cache(maxsize=None)
def _group_tiles_for(c: int, warps: int, wide: bool = False) -> tuple[int, int, dict]:
    cpg = c // GROUPS
    block_g = triton_next_pow2(cpg)
    gpp = max(1, min(GROUPS, (32 if wide else 128) // block_g))
    step, warps = (8192, 8) if wide else (2048, warps)
    return cpg, GROUPS // gpp, dict(BLOCK_B=max(1, step // (gpp * block_g)), GPP=gpp, BLOCK_G=block_g,
                                    num_warps=warps)


def _apply(x: torch.Tensor, x2: torch.Tensor | None, aff: torch.Tensor, act: bool,
           resample: str | None) -> torch.Tensor:
    """y = resample(act(x A + B)), x being cat([x, x2], 1) when x2 is given (never resampled)."""
    n, c1, h, wd = x.shape
    c = c1 + (x2.shape[1] if x2 is not None else 0)
    ho, wo = _resampled(h, wd, resample)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    block_r, block_c = _blocks(c)
    _launch("apply", (-(-ho * wo // block_r), n), x, x2 if x2 is not None else x, aff, y, h * wd, ho * wo, wd, wo,
            c, c1, ACT=act, RESAMPLE=_RESAMPLE[resample], TWO=x2 is not None, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_WARPS)
    return y


class _NormAct(torch.autograd.Function):
    """y = resample(act(x A + B)) with the GroupNorm gradient for x (AFF, the packed A, B, W, RS,
    XO of ``_affine(..., grad=True)``, carries none)."""

    @staticmethod
    def forward(ctx, x, aff, act: bool, resample: str | None):
        y = _apply(x, None, aff, act, resample)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, aff)
        ctx.act, ctx.resample = act, resample
        return y

    @staticmethod
    def backward(ctx, dy):
        x, aff = ctx.saved_tensors
        dy = _nhwc(dy)
        n, c, h, wd = x.shape
        ho, wo = dy.shape[-2:]
        hw = h * wd
        block_r, block_c = _blocks(c)
        rpp, nblk = _split(hw, n, block_r, x.device)
        part = torch.empty((2, n, nblk, c), dtype=torch.float32, device=x.device)  # per-block sums
        geometry = (hw, ho * wo, wd, wo, c)
        mode = dict(ACT=ctx.act, RESAMPLE=_RESAMPLE[ctx.resample], BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS)
        _launch("bwd_stats", (nblk, n), x, dy, aff, part, *geometry, rpp, STAGES=_LOOP_STAGES, **mode)
        means = torch.empty((2, n, c), dtype=torch.float32, device=x.device)  # their group means
        cpg, grid, tiles = _group_tiles(c, nblk)
        _launch("bwd_finalize", (n, grid), part, means, nblk, hw, c, cpg, rpp, 1.0 / (hw * cpg), **tiles)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        _launch("bwd_apply", (-(-hw // block_r), n), x, dy, aff, means, dx, *geometry, **mode)
        return dx, None, None, None


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
                   in_bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None, act: bool = True, resample: str | None = None,
                   x2: torch.Tensor | None = None) -> torch.Tensor:
    """resample(act(GroupNorm_32(x + in_bias) * (1 + scale) + shift)), fused; channels_last out,
    x's dtype.

    ``in_bias``: [C] (a conv bias left out of the conv) or [N, C] (an embedding added before the
    norm). ``scale`` / ``shift``: [N, C] (AdaGN), both or neither. ``act``: SiLU or identity.
    ``resample``: None, "up" (nearest 2x) or "down" (2x2 average), written directly at the new
    size. ``x2``: more channels, the norm running over cat([x, x2], 1) read in place from both
    (the U-Net decoder's input, whose concatenation is then never written; not with resample).
    Differentiable in x (and x2) only (the parameters must be frozen).
    """
    x = _nhwc(x)
    _resampled(*x.shape[-2:], resample)
    if x2 is not None:
        if x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:] or x2.dtype != x.dtype or resample:
            raise ValueError(f"group_norm_act: x2 {tuple(x2.shape)} {x2.dtype} cannot follow x {tuple(x.shape)} "
                             f"{x.dtype} (same batch, size and dtype, no resample)")
        x2 = _nhwc(x2)
        if torch.is_grad_enabled() and (x.requires_grad or x2.requires_grad):  # backward: one input
            x, x2 = torch.cat([x, x2], dim=1), None
    if not (torch.is_grad_enabled() and x.requires_grad):  # sampling: skip autograd's bookkeeping
        return _apply(x, x2, _affine(x, weight, bias, eps, in_bias, scale, shift, x2), bool(act), resample)
    with torch.no_grad():
        aff = _affine(x, weight, bias, eps, in_bias, scale, shift, grad=True)
    return _NormAct.apply(x, aff, bool(act), resample)


# Geometry of the residual add that takes its output's statistics (``layers.RESIDUAL_STATS``):
# rows per statistics block, elements per program tile, warps. Each program loops over its
# block's tiles. With 128-row blocks the partial results are ~3% of the bytes it writes (2 x
# float32 per channel per 128 rows of half-precision y) and ``finalize`` loops over HW / 128 of
# them; but session 14's H200 timed that (128, 4096, 4) at 2.7x the plain add's time (one tile in
# flight per program, two cross-warp reductions per tile). Rows no more than the tile's rows give
# one tile per program, no loop (the kernel's ONE_TILE: two reductions; offline for sm_90, 59
# registers at 16 x 256, against 92 for the loop and 54 for the plain add), at the cost of more
# blocks for the finalize; benchmarks/ops.py times the choices (``--add-stats``).
_RESIDUAL_STATS_ROWS, _RESIDUAL_STATS_TILE, _RESIDUAL_STATS_WARPS = 128, _TILE, _WARPS


def _residual_add(x: torch.Tensor, r: torch.Tensor, bias: torch.Tensor | None, resample: str | None,
                  stats: bool) -> torch.Tensor:
    x, r = _nhwc(x), _nhwc(r)
    n, c, ho, wo = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    hr, wr = r.shape[-2:]
    block_r, block_c = _tile_shape(c, _RESIDUAL_STATS_TILE)
    rpp = max(block_r, _RESIDUAL_STATS_ROWS)  # (both powers of two: whole tiles)
    token, part = _part_to_keep(stats, n, ho * wo, rpp, c, x.device)
    warps = _RESIDUAL_STATS_WARPS
    if part is None:
        (block_r, block_c), warps = _blocks(c), _WARPS
        rpp = block_r
    _launch("residual_add", (-(-ho * wo // rpp), n), x, r, bias if bias is not None else x, y,
            part if part is not None else y, ho * wo, hr * wr, wr, wo, c, rpp, HAS_BIAS=bias is not None,
            RESAMPLE=_RESAMPLE[resample], STATS=part is not None, ONE_TILE=rpp == block_r,
            STAGES=_LOOP_STAGES, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    if part is not None:
        _keep(y, token, (part, rpp, part.shape[2]))
    return y


class _AddBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, bias, resample):
        ctx.resample = resample
        return _residual_add(x, r, bias, resample, stats=False)

    @staticmethod
    def backward(ctx, g):
        if ctx.resample == "up":  # each residual pixel fed four outputs
            gr = F.avg_pool2d(g, 2, divisor_override=1)  # the 2x2 sum, in one op
        elif ctx.resample == "down":  # each output averaged four residual pixels
            gr = F.interpolate(g * 0.25, scale_factor=2, mode="nearest")  # (scaled at 1/4 the size)
        else:
            gr = g
        return g, gr, None, None


def add_bias(x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None,
             resample: str | None = None, stats: bool = True) -> torch.Tensor:
    """x + resample(residual) + bias[c] in one pass (the residual block's closing add with the
    conv bias that ``conv_nobias`` left out). Differentiable in x and residual.

    ``stats``: without gradients and inside ``shared_statistics``, also take the output's
    statistics (per 128 rows, in the same pass) and keep them on it for the norm that reads it
    next, which then reads nothing."""
    want = (*residual.shape[:2], *_resampled(*residual.shape[-2:], resample))
    if tuple(x.shape) != want:
        raise ValueError(f"add_bias: shapes differ, {tuple(x.shape)} vs {want} (residual {tuple(residual.shape)}, "
                         f"resample {resample})")
    if not (torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad)):
        return _residual_add(x, residual, bias, resample, stats)
    return _AddBias.apply(x, residual, bias, resample)


def conv_nobias(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) without its bias (folded into the next fused op)."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv1x1_cat(conv: torch.nn.Conv2d, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv of cat([x, x2], 1) without its bias, as two GEMMs over the channels_last
    pixels (the second accumulating into the first's output): W [x; x2] = W_x x + W_x2 x2, so the
    concatenation is never written. Returns a channels_last [N, C_out, H, W] tensor."""
    n, c1, h, w = x.shape
    weight = conv.weight[:, :, 0, 0]  # [C_out, C1 + C2]

    def pixels(t):  # [N, C, H, W] channels_last -> its [N H W, C] matrix, a view
        return _nhwc(t).permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    out = F.linear(pixels(x), weight[:, :c1])
    out.addmm_(pixels(x2), weight[:, c1:].t())
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


# Tiles of ``skip_add``'s GEMM: rows, output channels, input channels per step; warps, stages
# (the fastest of three on an H100, benchmarks/ops.py). Each stage holds a 128 x 64 tile of x and
# a 64 x 128 tile of W^T: 32 KB in half precision, 96 KB for 3 stages, more than GPUs with
# ~100 KB of shared memory per block (sm86, sm89, sm120) have; they get 2 stages.
_GEMM_M, _GEMM_N, _GEMM_K, _GEMM_WARPS, _GEMM_STAGES = 128, 128, 64, 4, 3
# The decoder's [x; x2] as one K loop (one software pipeline over both parts) instead of one loop
# per part, each of which fills and drains its own pipeline: at the 256x256 model's level 0 each
# part is 4 tiles of 64 channels, as few as the stages' reach. Compiled for sm_90 by Triton 3.6
# both forms are pipelined (cp.async, 96 KB of shared memory) at the same registers; off until a
# GPU has timed it (benchmarks/ops.py --tiles M:N:K:W:S:1, bench.py --skip-gemm).
_GEMM_ONE_LOOP = False


def gemm_runs(h: torch.Tensor) -> bool:
    """Whether the Triton GEMMs (``skip_add``, ``conv_in_direct``) take this activation or weight:
    half precision (they run on the tensor cores; float32 keeps cuBLAS and cuDNN, and their TF32
    setting), or any dtype in Triton's interpreter."""
    return h.dtype in (torch.float16, torch.bfloat16) or interpreted()


def _gemm_stages(device_index: int | None) -> int:
    """Pipeline stages of ``skip_add`` at the current tiles that fit the GPU's shared memory (one
    stage's worth left for the epilogue's layout conversions)."""
    return _stages_that_fit(device_index, _GEMM_M, _GEMM_N, _GEMM_K, _GEMM_STAGES)


@functools.lru_cache(maxsize=None)
def _stages_that_fit(device_index: int | None, m: int, n: int, k: int, stages: int) -> int:
    # (keyed by the tiles too: benchmarks/ops.py sets other ones in one process)
    if device_index is None or not torch.cuda.is_available():
        return stages
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or \
        (160 * 1024 if torch.cuda.get_device_capability(device_index) in ((8, 0), (9, 0), (10, 0)) else 99 * 1024)
    return max(2, min(stages, smem // ((m * k + k * n) * 2) - 1))


def skip_add(h: torch.Tensor, x: torch.Tensor, x2: torch.Tensor | None, weight_t: torch.Tensor,
             bias: torch.Tensor, stats: bool = True) -> torch.Tensor:
    """h + bias + W [x; x2] in one Triton GEMM over the channels_last pixels (no gradient).

    The closing add of a residual block whose 1x1 skip conv changes the channel count: W is that
    conv's weight as ``weight_t`` = W^T, [C_in, C_out] contiguous (``skip_weight``); ``bias`` the
    summed biases ([C_out], ``ResBlock._closing_bias``); ``x2`` the decoder's skip connection
    (the block's input being cat([x, x2], 1), read in place) or None. Accumulated in float32 and
    rounded once. Against ``conv1x1_cat`` + ``add_bias`` it saves the GEMMs' intermediate (a
    write and two reads of a tensor the block's output size) and one launch; at 256x256 those
    ran 4.6 ms (GEMMs) + most of 4.8 ms (residual adds) of a 73.5 ms DDIM step on an H100.

    ``stats``: inside ``shared_statistics``, also take y's statistics in the epilogue (per row
    tile of the float32 result, where the tile divides the pixels per sample) and keep them on
    y for the norm that reads it next, which then reads nothing: the block outputs of the
    decoder, 18.5% of what the statistics kernel reads in a 256x256 forward
    (``benchmarks/reads.py``), for two column reductions per tile and ~3% more bytes written.
    """
    h, x = _nhwc(h), _nhwc(x)
    n, co, hh, ww = h.shape
    c1 = x.shape[1]
    c2 = 0 if x2 is None else x2.shape[1]
    if x.shape[0] != n or x.shape[2:] != h.shape[2:] or tuple(weight_t.shape) != (c1 + c2, co) \
            or tuple(bias.shape) != (co,) or (x2 is not None and (x2.shape[0] != n or x2.shape[2:] != h.shape[2:])):
        raise ValueError(f"skip_add: shapes do not fit: h {tuple(h.shape)}, x {tuple(x.shape)}, "
                         f"x2 {None if x2 is None else tuple(x2.shape)}, weight^T {tuple(weight_t.shape)}, "
                         f"bias {tuple(bias.shape)}")
    if len({t.dtype for t in (h, x, x2, weight_t) if t is not None}) != 1:
        raise ValueError(f"skip_add: h, x, x2 and the weight must share one dtype, got h {h.dtype}, x {x.dtype}, "
                         f"x2 {None if x2 is None else x2.dtype}, weight {weight_t.dtype}")
    weight_t, bias = weight_t.contiguous(), bias.contiguous()  # (no copies for skip_weight's output)
    if x2 is not None:
        x2 = _nhwc(x2)
    m = n * hh * ww
    y = torch.empty_like(h, memory_format=torch.channels_last)
    block_n = min(_GEMM_N, max(16, triton_next_pow2(co)))
    block_k = min(_GEMM_K, max(16, triton_next_pow2(min(c1, c2) if c2 else c1)))
    grid = (-(-m // _GEMM_M) * -(-co // block_n),)
    # Inside shared_statistics y's statistics come out of the epilogue, for the norm that reads y next.
    token, part = _part_to_keep(stats and (hh * ww) % _GEMM_M == 0, n, hh * ww, _GEMM_M, co, h.device)
    _launch("skip_add", grid, x, x2 if x2 is not None else x, weight_t, h, bias, y, part if part is not None else y,
            m, c1, c2, co, TWO=x2 is not None, ONE_LOOP=_GEMM_ONE_LOOP,
            F32=h.dtype == torch.float32 or (interpreted() and h.dtype == torch.bfloat16), STATS=part is not None,
            BLOCK_M=_GEMM_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_GEMM_WARPS,
            num_stages=_gemm_stages(h.device.index if h.is_cuda else None))
    if part is not None:
        _keep(y, token, (part, _GEMM_M, part.shape[2]))
    return y


def skip_weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv's weight as the [C_in, C_out] matrix ``skip_add`` reads."""
    return conv.weight[:, :, 0, 0].t().contiguous()


def conv_up(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv(nearest 2x upsample of x) without its bias, as one stride-2 transposed conv of x with
    ``weight`` = ``up_weight(conv)``: 4 multiply-adds per input channel and output pixel instead of
    9, and the norm before it writes x at the low resolution."""
    return F.conv_transpose2d(x, weight, None, stride=2, padding=1)


def up_weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 3x3 conv's [C_out, C_in, 3, 3] weight as the [C_in, C_out, 4, 4] weight of ``conv_up``
    (taps summed in float32, rounded once to the weight's dtype; its memory format kept).

    Per axis, the taps w0, w1, w2 of a 3x3 kernel over a nearest-upsampled input that land on the
    same low-resolution pixel: output 2i reads x[i-1] w0 + x[i] (w1 + w2), output 2i + 1 reads
    x[i] (w0 + w1) + x[i+1] w2. A transposed conv with stride 2, padding 1 and a 4-tap kernel K
    gives output o the terms x[i] K[o - 2i + 1]: K = (w2, w1 + w2, w0 + w1, w0). (Tensor ops
    only: made on the device inside the first sampling step, it must not synchronise.)
    """
    w = conv.weight
    if tuple(w.shape[2:]) != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1 \
            or conv.dilation != (1, 1):
        raise ValueError("up_weight: needs a 3x3 conv with stride 1, padding 1, no groups or dilation")

    def fold(t, dim):
        w0, w1, w2 = t.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    folded = fold(fold(w.to(torch.promote_types(w.dtype, torch.float32)), 2), 3).transpose(0, 1).to(w.dtype)
    cl = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return folded.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _round8(c: int) -> int:
    return -(-c // 8) * 8


def _same_padding_weight(conv: torch.nn.Conv2d, what: str) -> torch.Tensor:
    """conv's weight, checked to be what the input conv's forms assume."""
    kh, kw = conv.weight.shape[2:]
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or kh % 2 == 0 or kw % 2 == 0 \
            or conv.padding != (kh // 2, kw // 2):
        raise ValueError(f"{what}: needs an odd-sized conv with stride 1 and 'same' padding, no groups or dilation")
    return conv.weight


def in_weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    """The network's input conv ([C_out, C, 3, 3], C = 3 or 6 channels) widened for ``conv_in``:
    C_in rounded up to a multiple of 8 past C + 1, input channel C carrying the bias at the
    centre tap (it reads that channel's constant 1 at every pixel, never the zero padding)."""
    w = _same_padding_weight(conv, "in_weight")
    o, c = w.shape[:2]
    wide = torch.zeros((o, _round8(c + 1), *w.shape[2:]), dtype=w.dtype, device=w.device)
    wide[:, :c] = w
    if conv.bias is not None:
        wide[:, c, w.shape[2] // 2, w.shape[3] // 2] = conv.bias.to(w.dtype)
    return wide.contiguous(memory_format=torch.channels_last)


def conv_in(x: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
    """The input conv with its bias (``in_weight``): x gets the constant-1 channel and zeros up
    to the weight's width. cuDNN's half-precision kernels for 3 input channels were slow on an
    H100 (0.65 ms at 256x256, batch 16) and PyTorch adds a conv bias in a pass of its own (0.4 ms)."""
    n, c, hh, ww = x.shape
    wide = torch.zeros((n, hh, ww, weight.shape[1]), dtype=weight.dtype, device=x.device).permute(0, 3, 1, 2)
    wide[:, :c] = x
    wide[:, c] = 1
    return F.conv2d(wide, weight, None, 1, padding)


# ``conv_in_direct``'s output channels per program and warps: 8 warps hold its 128 x 128 float32
# tile in 90 registers per thread (128 with the statistics), compiled offline for sm_90; 4 take
# 158-238. Untimed: benchmarks/ops.py's "in" rows time the alternatives.
_CONV_IN_N, _CONV_IN_WARPS = 128, 8


def in_matrix(conv: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The input conv's [C_out, C, KH, KW] weight as ``conv_in_direct``'s [K, C_out] matrix, rows
    k = (i * KW + j) * C + c (tap-major), zeros up to K = the next power of two >= 16 past
    KH * KW * C; and its bias in float32 (zeros without one)."""
    w = _same_padding_weight(conv, "in_matrix")
    o, c, kh, kw = w.shape
    taps = kh * kw * c
    mat = torch.zeros((max(16, triton_next_pow2(taps)), o), dtype=w.dtype, device=w.device)
    mat[:taps] = w.permute(2, 3, 1, 0).reshape(taps, o)
    bias = conv.bias if conv.bias is not None else torch.zeros(o, device=w.device)
    return mat, bias.to(torch.float32)


def conv_in_direct(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor, kernel: tuple[int, int],
                   stats: bool = True) -> torch.Tensor:
    """The network's input conv (``in_matrix``'s weight, 'same' padding) as one Triton GEMM per
    output tile, its receptive field gathered from x in place (no gradient): channels_last y in
    the weight's dtype, its bias added in float32 and rounded once.

    The conv writes the U-Net's largest tensor from 3 (or 6) channels: its cost is the output's
    bytes, and cuDNN's kernels for the padded input (``conv_in``) took ~3.5x as long as writing
    them needs on an H100 (0.67 ms at 256x256, batch 16). ``stats``: inside ``shared_statistics``
    the epilogue also takes y's statistics per 128-row tile (where the tile divides the pixels per
    sample), as ``skip_add``'s does, for the first block's norm and the decoder's last skip.
    """
    n, c, hh, ww = x.shape
    kh, kw = kernel
    co = matrix.shape[1]
    if matrix.shape[0] < kh * kw * c or tuple(bias.shape) != (co,):
        raise ValueError(f"conv_in_direct: shapes do not fit: x {tuple(x.shape)}, kernel {kernel}, "
                         f"matrix {tuple(matrix.shape)}, bias {tuple(bias.shape)}")
    y = torch.empty((n, hh, ww, co), dtype=matrix.dtype, device=x.device).permute(0, 3, 1, 2)
    block_n = min(_CONV_IN_N, max(16, triton_next_pow2(co)))
    if co % block_n and co % 64 == 0:
        block_n = 64  # (192 channels: three tiles of 64, not two of 128 with one half empty)
    tiles_m = -(-(hh * ww) // _GEMM_M)
    token, part = _part_to_keep(stats and (hh * ww) % _GEMM_M == 0, n, hh * ww, _GEMM_M, co, x.device)
    _launch("conv_in", (tiles_m * -(-co // block_n), n), x, matrix, bias, y, part if part is not None else y,
            *x.stride(), hh, ww, c, co, KH=kh, KW=kw,
            F32=matrix.dtype == torch.float32 or (interpreted() and matrix.dtype == torch.bfloat16),
            STATS=part is not None, BLOCK_M=_GEMM_M, BLOCK_N=block_n, BLOCK_K=matrix.shape[0],
            num_warps=_CONV_IN_WARPS)
    if part is not None:
        _keep(y, token, (part, _GEMM_M, part.shape[2]))
    return y


def out_weight(conv: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output conv's weight and bias with C_out rounded up to a multiple of 8 (zeros)."""
    w, b = conv.weight, conv.bias
    o = w.shape[0]
    wide = torch.zeros((_round8(o), *w.shape[1:]), dtype=w.dtype, device=w.device)
    wide[:o] = w
    bias = None
    if b is not None:
        bias = torch.zeros(wide.shape[0], dtype=b.dtype, device=b.device)
        bias[:o] = b
    return wide.contiguous(memory_format=torch.channels_last), bias


def conv_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, channels: int, padding) -> torch.Tensor:
    """The output conv with ``out_weight``'s padded outputs, the first ``channels`` kept (a view)."""
    return F.conv2d(x, weight, bias, 1, padding)[:, :channels]


def reference_group_norm_act(x, weight, bias, eps=1e-5, *, in_bias=None, scale=None, shift=None, act=True,
                             resample=None, x2=None):
    """The same function in plain float64 PyTorch ops (the tests' truth, and a readable definition)."""
    if x2 is not None:
        x = torch.cat([x, x2], dim=1)
    n, c = x.shape[:2]
    z = x.double()
    if in_bias is not None:
        ib = in_bias.double()
        z = z + (ib[None, :, None, None] if ib.dim() == 1 else ib.reshape(n, c)[:, :, None, None])
    z = F.group_norm(z, GROUPS, weight.double(), bias.double(), eps)
    if scale is not None:
        z = z * (1 + scale.double().reshape(n, c)[..., None, None]) + shift.double().reshape(n, c)[..., None, None]
    z = F.silu(z) if act else z
    if resample == "up":
        z = F.interpolate(z, scale_factor=2, mode="nearest")
    elif resample == "down":
        z = F.avg_pool2d(z, 2)
    return z
