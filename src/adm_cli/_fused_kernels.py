"""The Triton kernels behind fused.py (imported on first use, so TRITON_INTERPRET set before that
runs them on CPU). All activations are channels_last: sample n is an [HW, C] matrix of rows
(pixels) with unit channel stride. RESAMPLE: 0 none, 1 nearest 2x upsample, 2 2x2 average pool
(BigGAN-style up/down residual blocks), applied to the output of ``apply`` and to the residual of
``residual_add``; W_IN / W_OUT are the widths before and after.

Small per-sample results travel packed, one buffer each (one allocation, no views on the host):
PART = [2, N, NBLK, C] (the statistics' per-block means and M2, or bwd_stats' two sums), AFF =
[2 or 5, N, C] (finalize's A, B and, for a backward, W, RS, XO), M = [2, N, C] (bwd_finalize's
group means). Each kernel finds the second and later planes from its grid (N is a grid axis).
"""

import triton
import triton.language as tl


@triton.jit
def _source_row(rows, W_IN, W_OUT, RESAMPLE: tl.constexpr, a: tl.constexpr, b: tl.constexpr):
    """Input row read for output row ``rows``: the same (0), the parent pixel (1), or child (a, b) (2)."""
    if RESAMPLE == 0:
        return rows
    oi = rows // W_OUT
    oj = rows % W_OUT
    if RESAMPLE == 1:
        return (oi // 2) * W_IN + oj // 2
    return (2 * oi + a) * W_IN + 2 * oj + b


@triton.jit
def _rows(X, X2, n, rows, mask, cols, HW, C, C1, TWO: tl.constexpr):
    """Rows ``rows`` ([BLOCK_R, BLOCK_C]) of sample n: of X ([HW, C]), or (TWO) of the channel
    concatenation of X ([HW, C1]) and X2 ([HW, C - C1]) read in place (the U-Net decoder's
    cat(h, skip) is never written)."""
    r = rows[:, None].to(tl.int64)
    if TWO:
        c2 = C - C1
        first = (cols < C1)[None, :]
        a = tl.load(X + n * HW * C1 + r * C1 + cols[None, :], mask=mask & first, other=0.0)
        b = tl.load(X2 + n * HW * c2 + r * c2 + (cols - C1)[None, :], mask=mask & (cols >= C1)[None, :], other=0.0)
        return tl.where(first, a, b)
    return tl.load(X + n * HW * C + r * C + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _block_of_rows(C, BLOCK_C: tl.constexpr):
    """A row-block reduction program (blk, n): its block, sample, the number of blocks per
    sample, and the channels with their mask."""
    cols = tl.arange(0, BLOCK_C)
    return tl.program_id(0), tl.program_id(1).to(tl.int64), tl.num_programs(0), cols, cols < C


@triton.jit
def _group_tile(C, CPG, GPP: tl.constexpr, BLOCK_G: tl.constexpr):
    """A per-group program (n, k): its sample, and groups [k * GPP, (k + 1) * GPP) as a
    [GPP, BLOCK_G] tile of channels with its mask."""
    groups = tl.program_id(1) * GPP + tl.arange(0, GPP)
    j = tl.arange(0, BLOCK_G)
    cols = groups[:, None] * CPG + j[None, :]
    cmask = (j < CPG)[None, :] & (groups < C // CPG)[:, None]
    return tl.program_id(0).to(tl.int64), cols, cmask


@triton.jit
def _shifted_sums(acc1, acc2, x, mask, shift):
    d = tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)
    return acc1 + d, acc2 + d * d


@triton.jit
def stats(X, X2, IB, IB_SN, PART, HW, C, C1, RPP, HAS_IB: tl.constexpr, TWO: tl.constexpr,
          PREFETCH: tl.constexpr, STAGES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (blk, n): per-channel mean and M2 over rows [blk * RPP, (blk + 1) * RPP). Sums of
    # x - K with K the first chunk's mean (close to the block's mean, so the shifted sum of
    # squares loses nothing to cancellation), accumulated elementwise in registers and reduced
    # once at the end. PREFETCH: each chunk's load is issued before the previous chunk's
    # arithmetic, two chunks in flight per program instead of one (the two accumulators leave
    # room for only a few programs per multiprocessor, so the loads' latency shows). STAGES > 1
    # (without PREFETCH): Triton's pipeliner issues the next STAGES - 1 chunks' loads as
    # asynchronous copies into shared memory while this one is summed (fused._LOOP_STAGES).
    blk, n, nblk, cols, cmask = _block_of_rows(C, BLOCK_C)
    ib = tl.zeros([BLOCK_C], tl.float32)
    if HAS_IB:
        ib = tl.load(IB + n * IB_SN + cols, mask=cmask, other=0.0).to(tl.float32)
    start = blk * RPP
    rows0 = start + tl.arange(0, BLOCK_R)
    rmask0 = rows0 < HW
    mask0 = rmask0[:, None] & cmask[None, :]
    x0 = _rows(X, X2, n, rows0, mask0, cols, HW, C, C1, TWO)
    x0 = tl.where(mask0, x0.to(tl.float32) + ib[None, :], 0.0)
    k = tl.sum(x0, axis=0) / tl.sum(rmask0.to(tl.float32), axis=0)
    shift = k - ib  # subtracted from the raw x
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    if PREFETCH:
        end = tl.minimum(HW, start + RPP)
        xv = _rows(X, X2, n, rows0, mask0, cols, HW, C, C1, TWO)
        mask = mask0
        for r0 in range(BLOCK_R, RPP + BLOCK_R, BLOCK_R):  # the last load is past RPP: masked off
            rows = start + r0 + tl.arange(0, BLOCK_R)
            nmask = (rows < end)[:, None] & cmask[None, :]
            xn = _rows(X, X2, n, rows, nmask, cols, HW, C, C1, TWO)
            acc1, acc2 = _shifted_sums(acc1, acc2, xv, mask, shift)
            xv = xn
            mask = nmask
    else:
        for r0 in tl.range(0, RPP, BLOCK_R, num_stages=STAGES):  # the last program's tail chunks may be empty
            rows = start + r0 + tl.arange(0, BLOCK_R)
            mask = (rows < HW)[:, None] & cmask[None, :]
            acc1, acc2 = _shifted_sums(acc1, acc2, _rows(X, X2, n, rows, mask, cols, HW, C, C1, TWO), mask, shift)
    cnt = tl.minimum(RPP, HW - start).to(tl.float32)
    s1 = tl.sum(acc1, axis=0)
    out = (n * nblk + blk) * C + cols
    tl.store(PART + out, k + s1 / cnt, mask=cmask)  # plane 0: means, plane 1: M2
    tl.store(PART + tl.num_programs(1) * nblk * C + out, tl.maximum(tl.sum(acc2, axis=0) - s1 * s1 / cnt, 0.0),
             mask=cmask)


@triton.jit
def _partials(n, b0, cols, cmask, NBLK, HW, C, RPP, BLOCK_B: tl.constexpr):
    """Offsets, mask and row counts ([BLOCK_B, 1, 1]) of stats' blocks b0 .. b0 + BLOCK_B for the
    [GPP, BLOCK_G] channel tile ``cols``."""
    bs = b0 + tl.arange(0, BLOCK_B)
    bmask = bs < NBLK
    cnt = tl.where(bmask, tl.minimum(RPP, HW - bs * RPP), 0).to(tl.float32)
    idx = (n * NBLK + bs[:, None, None]) * C + cols[None, :, :]
    return idx, bmask[:, None, None] & cmask[None, :, :], cnt[:, None, None]


@triton.jit
def _sum_means(PART, n, cols, cmask, NBLK, HW, CS, RPP, BLOCK_B: tl.constexpr, GPP: tl.constexpr,
               BLOCK_G: tl.constexpr):
    """Per channel of the tile, the sum over one PART's blocks of count x block mean (CS: that
    PART's channel count, ``cols`` already its channel indices)."""
    s = tl.zeros([GPP, BLOCK_G], tl.float32)
    for b0 in range(0, NBLK, BLOCK_B):
        idx, mask, cnt = _partials(n, b0, cols, cmask, NBLK, HW, CS, RPP, BLOCK_B)
        s += tl.sum(tl.load(PART + idx, mask=mask, other=0.0) * cnt, axis=0)
    return s


@triton.jit
def _sum_m2(PART, n, cols, cmask, NBLK, HW, CS, RPP, mean, BLOCK_B: tl.constexpr, GPP: tl.constexpr,
            BLOCK_G: tl.constexpr):
    """Per channel of the tile, the sum over one PART's blocks of M2 + count (block mean - mean)^2,
    ``mean`` [GPP] being the groups' means."""
    M2 = PART + tl.num_programs(0) * NBLK * CS
    q = tl.zeros([GPP, BLOCK_G], tl.float32)
    for b0 in range(0, NBLK, BLOCK_B):
        idx, mask, cnt = _partials(n, b0, cols, cmask, NBLK, HW, CS, RPP, BLOCK_B)
        m = tl.load(PART + idx, mask=mask, other=0.0)
        v = tl.load(M2 + idx, mask=mask, other=0.0)
        d = tl.where(mask, m - mean[None, :, None], 0.0)
        q += tl.sum(v + cnt * d * d, axis=0)
    return q


@triton.jit
def finalize(PART, PART2, GAMMA, BETA, IB, IB_SN, SCALE, SHIFT, SS_SN, AFF, NBLK, NBLK2, HW, C, C1, CPG, RPP,
             RPP2, eps, HAS_IB: tl.constexpr, HAS_SS: tl.constexpr, GRAD: tl.constexpr, SPLIT: tl.constexpr,
             BLOCK_B: tl.constexpr, GPP: tl.constexpr, BLOCK_G: tl.constexpr):
    # Program (n, k): groups [k * GPP, (k + 1) * GPP) as a [GPP, BLOCK_G] tile of channels.
    # Combine the blocks' (count, mean, M2) per group (Chan et al.), then fold norm, affine,
    # scale-shift and the input bias into y = x A + B. GRAD: also W, RS, XO for the backward.
    # Channels [0, C1) have their blocks in PART ([2, N, NBLK, C1], RPP rows each); C1 = C unless
    # SPLIT, where the rest are in PART2 ([2, N, NBLK2, C - C1], RPP2 rows): the statistics of
    # cat([x, x2], 1) from each input's own (x2's kept from an earlier norm that read it); a
    # group may straddle the boundary.
    n, cols, cmask = _group_tile(C, CPG, GPP, BLOCK_G)  # cols: [GPP, BLOCK_G]
    total = (HW * CPG) * 1.0
    first, second = cmask & (cols < C1), cmask & (cols >= C1)
    s = _sum_means(PART, n, cols, first, NBLK, HW, C1, RPP, BLOCK_B, GPP, BLOCK_G)
    if SPLIT:
        s += _sum_means(PART2, n, cols - C1, second, NBLK2, HW, C - C1, RPP2, BLOCK_B, GPP, BLOCK_G)
    mean = tl.sum(s, axis=1) / total                               # [GPP]
    q = _sum_m2(PART, n, cols, first, NBLK, HW, C1, RPP, mean, BLOCK_B, GPP, BLOCK_G)
    if SPLIT:
        q += _sum_m2(PART2, n, cols - C1, second, NBLK2, HW, C - C1, RPP2, mean, BLOCK_B, GPP, BLOCK_G)
    rstd = (1.0 / tl.sqrt(tl.sum(q, axis=1) / total + eps))[:, None]  # [GPP, 1]
    mean = mean[:, None]
    gamma = tl.load(GAMMA + cols, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(BETA + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.full([GPP, BLOCK_G], 1.0, tl.float32)
    sh = tl.zeros([GPP, BLOCK_G], tl.float32)
    if HAS_SS:
        s1 += tl.load(SCALE + n * SS_SN + cols, mask=cmask, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + n * SS_SN + cols, mask=cmask, other=0.0).to(tl.float32)
    ib = tl.zeros([GPP, BLOCK_G], tl.float32)
    if HAS_IB:
        ib = tl.load(IB + n * IB_SN + cols, mask=cmask, other=0.0).to(tl.float32)
    w = gamma * s1                     # dz / dx^
    a = rstd * w                       # dz / dx
    bb = (beta - mean * rstd * gamma) * s1 + sh + ib * a
    out = n * C + cols
    nc = tl.num_programs(0) * C
    tl.store(AFF + out, a, mask=cmask)
    tl.store(AFF + nc + out, bb, mask=cmask)
    if GRAD:
        tl.store(AFF + 2 * nc + out, w, mask=cmask)
        tl.store(AFF + 3 * nc + out, tl.zeros([GPP, BLOCK_G], tl.float32) + rstd, mask=cmask)
        tl.store(AFF + 4 * nc + out, (ib - mean) * rstd, mask=cmask)  # x^ = x rstd + XO


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _gather(base, rows, mask, a, b, W_IN, W_OUT, C, AFFINE: tl.constexpr, ACT: tl.constexpr,
            RESAMPLE: tl.constexpr):
    """Value at output rows ``rows`` of resample(f(x)), f = act(x a + b) (AFFINE) or identity:
    the same row, the parent pixel (upsample), or the mean of the four children (average pool)."""
    src = _source_row(rows, W_IN, W_OUT, RESAMPLE, 0, 0)
    v = tl.load(base + src[:, None].to(tl.int64) * C, mask=mask, other=0.0).to(tl.float32)
    if AFFINE:
        v = _act(v * a + b, ACT)
    if RESAMPLE == 2:
        for ab in tl.static_range(1, 4):
            src = _source_row(rows, W_IN, W_OUT, RESAMPLE, ab // 2, ab % 2)
            u = tl.load(base + src[:, None].to(tl.int64) * C, mask=mask, other=0.0).to(tl.float32)
            if AFFINE:
                u = _act(u * a + b, ACT)
            v += u
        v = v * 0.25
    return v


@triton.jit
def _tile(HW, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (pid, n)'s rows, channels and mask over an [HW, C] sample."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (rows < HW)[:, None] & cmask[None, :]
    return rows, cols, cmask, mask


@triton.jit
def apply(X, X2, AFF, Y, HW_IN, HW_OUT, W_IN, W_OUT, C, C1, ACT: tl.constexpr, RESAMPLE: tl.constexpr,
          TWO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = resample(act(x A + B)); rows are output pixels. TWO: x is cat(X, X2), never resampled.
    n = tl.program_id(1).to(tl.int64)
    rows, cols, cmask, mask = _tile(HW_OUT, C, BLOCK_R, BLOCK_C)
    a = tl.load(AFF + n * C + cols, mask=cmask, other=0.0)[None, :]
    b = tl.load(AFF + tl.num_programs(1) * C + n * C + cols, mask=cmask, other=0.0)[None, :]
    if TWO:
        z = _act(_rows(X, X2, n, rows, mask, cols, HW_OUT, C, C1, True).to(tl.float32) * a + b, ACT)
    else:
        z = _gather(X + n * HW_IN * C + cols[None, :], rows, mask, a, b, W_IN, W_OUT, C, True, ACT, RESAMPLE)
    tl.store(Y + n * HW_OUT * C + rows[:, None].to(tl.int64) * C + cols[None, :], z.to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _per_channel(AFF, n, C, cols, cmask):
    """The [1, BLOCK_C] rows of sample n of the five per-channel vectors (A, B, W, RS, XO) that
    finalize packs into AFF for a backward (the grid's axis 1 runs over the N samples)."""
    nc = tl.num_programs(1) * C
    base = AFF + n * C + cols
    a = tl.load(base, mask=cmask, other=0.0)[None, :]
    b = tl.load(base + nc, mask=cmask, other=0.0)[None, :]
    w = tl.load(base + 2 * nc, mask=cmask, other=0.0)[None, :]
    rs = tl.load(base + 3 * nc, mask=cmask, other=0.0)[None, :]
    xo = tl.load(base + 4 * nc, mask=cmask, other=0.0)[None, :]
    return a, b, w, rs, xo


@triton.jit
def _grad_z(X, DY, n, rows, mask, cols, a, b, HW_IN, HW_OUT, W_IN, W_OUT, C, ACT: tl.constexpr,
            RESAMPLE: tl.constexpr):
    """x and dL/dz at input rows ``rows``: dL/dy is gathered back through the resampling (a
    parent's gradient / 4 for the average pool, the sum of the four children for the upsample),
    then times SiLU'(z)."""
    x = tl.load(X + n * HW_IN * C + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    dyb = DY + n * HW_OUT * C + cols[None, :]
    if RESAMPLE == 0:
        dy = tl.load(dyb + rows[:, None].to(tl.int64) * C, mask=mask, other=0.0).to(tl.float32)
    elif RESAMPLE == 2:  # forward: output (i, j) = mean of inputs (2i + a, 2j + b)
        par = ((rows // W_IN) // 2) * W_OUT + (rows % W_IN) // 2
        dy = tl.load(dyb + par[:, None].to(tl.int64) * C, mask=mask, other=0.0).to(tl.float32) * 0.25
    else:  # forward: outputs (2i + a, 2j + b) = input (i, j)
        i = rows // W_IN
        jj = rows % W_IN
        dy = tl.zeros(x.shape, tl.float32)
        for ab in tl.static_range(4):
            child = (2 * i + ab // 2) * W_OUT + 2 * jj + ab % 2
            dy += tl.load(dyb + child[:, None].to(tl.int64) * C, mask=mask, other=0.0).to(tl.float32)
    if ACT:
        z = x * a + b
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))  # SiLU'(z)
    return x, dy


@triton.jit
def bwd_stats(X, DY, AFF, PART, HW_IN, HW_OUT, W_IN, W_OUT, C, RPP, ACT: tl.constexpr,
              RESAMPLE: tl.constexpr, STAGES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (blk, n): per-channel sums of g = dL/dz * w and g * x^ over the block's input rows
    # (STAGES: the row loop's pipeline, as in ``stats``).
    blk, n, nblk, cols, cmask = _block_of_rows(C, BLOCK_C)
    a, b, w, rs, xo = _per_channel(AFF, n, C, cols, cmask)
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    start = blk * RPP
    for r0 in tl.range(0, RPP, BLOCK_R, num_stages=STAGES):
        rows = start + r0 + tl.arange(0, BLOCK_R)
        mask = (rows < HW_IN)[:, None] & cmask[None, :]
        x, dz = _grad_z(X, DY, n, rows, mask, cols, a, b, HW_IN, HW_OUT, W_IN, W_OUT, C, ACT, RESAMPLE)
        g = dz * w
        acc1 += g
        acc2 += g * (x * rs + xo)
    out = (n * nblk + blk) * C + cols
    tl.store(PART + out, tl.sum(acc1, axis=0), mask=cmask)
    tl.store(PART + tl.num_programs(1) * nblk * C + out, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def bwd_finalize(PART, M, NBLK, HW, C, CPG, RPP, inv_count, BLOCK_B: tl.constexpr, GPP: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    # Program (n, k): the group means of bwd_stats' two sums for groups [k * GPP, (k + 1) * GPP),
    # written out per channel (what bwd_apply reads).
    n, cols, cmask = _group_tile(C, CPG, GPP, BLOCK_G)  # cols: [GPP, BLOCK_G]
    S1 = PART
    S2 = PART + tl.num_programs(0) * NBLK * C
    a = tl.zeros([GPP, BLOCK_G], tl.float32)
    b = tl.zeros([GPP, BLOCK_G], tl.float32)
    for b0 in range(0, NBLK, BLOCK_B):
        idx, mask, _ = _partials(n, b0, cols, cmask, NBLK, HW, C, RPP, BLOCK_B)
        a += tl.sum(tl.load(S1 + idx, mask=mask, other=0.0), axis=0)
        b += tl.sum(tl.load(S2 + idx, mask=mask, other=0.0), axis=0)
    zero = tl.zeros([GPP, BLOCK_G], tl.float32)
    out = n * C + cols
    tl.store(M + out, zero + (tl.sum(a, axis=1) * inv_count)[:, None], mask=cmask)
    tl.store(M + tl.num_programs(0) * C + out, zero + (tl.sum(b, axis=1) * inv_count)[:, None], mask=cmask)


@triton.jit
def bwd_apply(X, DY, AFF, M, DX, HW_IN, HW_OUT, W_IN, W_OUT, C, ACT: tl.constexpr,
              RESAMPLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # dx = rstd (g - mean_G(g) - x^ mean_G(g x^)), rows are input pixels.
    n = tl.program_id(1).to(tl.int64)
    rows, cols, cmask, mask = _tile(HW_IN, C, BLOCK_R, BLOCK_C)
    a, b, w, rs, xo = _per_channel(AFF, n, C, cols, cmask)
    m1 = tl.load(M + n * C + cols, mask=cmask, other=0.0)[None, :]
    m2 = tl.load(M + tl.num_programs(1) * C + n * C + cols, mask=cmask, other=0.0)[None, :]
    x, dz = _grad_z(X, DY, n, rows, mask, cols, a, b, HW_IN, HW_OUT, W_IN, W_OUT, C, ACT, RESAMPLE)
    dx = rs * (dz * w - m1 - (x * rs + xo) * m2)
    tl.store(DX + n * HW_IN * C + rows[:, None].to(tl.int64) * C + cols[None, :], dx.to(DX.dtype.element_ty),
             mask=mask)


@triton.jit
def _residual_rows(X, R, BIAS, Y, n, rows, cols, cmask, HW_OUT, HW_R, W_R, W_OUT, C, HAS_BIAS: tl.constexpr,
                   RESAMPLE: tl.constexpr):
    """y = x + resample(r) + bias at output rows ``rows`` of sample n, stored; returns y as stored
    (float32) and the mask."""
    mask = (rows < HW_OUT)[:, None] & cmask[None, :]
    off = n * HW_OUT * C + rows[:, None].to(tl.int64) * C + cols[None, :]
    y = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    y += _gather(R + n * HW_R * C + cols[None, :], rows, mask, 0.0, 0.0, W_R, W_OUT, C, False, False, RESAMPLE)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = y.to(Y.dtype.element_ty)
    tl.store(Y + off, y, mask=mask)
    return y.to(tl.float32), mask


@triton.jit
def residual_add(X, R, BIAS, Y, PART, HW_OUT, HW_R, W_R, W_OUT, C, RPP, HAS_BIAS: tl.constexpr,
                 RESAMPLE: tl.constexpr, STATS: tl.constexpr, ONE_TILE: tl.constexpr, STAGES: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = x + resample(r) + bias: a residual block's closing add, its skip resampled on the fly.
    # Program (blk, n). Without STATS: one BLOCK_R-row tile. STATS: rows [blk * RPP, (blk + 1) * RPP)
    # tile by tile, and y's per-channel mean and M2 over them (as stored, shifted by the first
    # tile's mean, as in ``stats``) into PART [2, N, NBLK, C]: the next norm's statistics blocks,
    # so that norm never reads y for them. Per tile, the sums are reduced over its rows at once
    # (vectors, not tiles, carried across the loop: the plain add's registers, its occupancy).
    # ONE_TILE (RPP = BLOCK_R, no loop): the block's exact mean, then M2 about it: two reductions
    # over the rows in registers instead of four. STAGES: the STATS loop's pipeline, as in ``stats``.
    n = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if STATS and ONE_TILE:
        start = tl.program_id(0) * BLOCK_R
        y, mask = _residual_rows(X, R, BIAS, Y, n, start + tl.arange(0, BLOCK_R), cols, cmask, HW_OUT, HW_R, W_R,
                                 W_OUT, C, HAS_BIAS, RESAMPLE)
        mean = tl.sum(tl.where(mask, y, 0.0), axis=0) / tl.minimum(BLOCK_R, HW_OUT - start).to(tl.float32)
        d = tl.where(mask, y - mean[None, :], 0.0)
        out = (n * tl.num_programs(0) + tl.program_id(0)) * C + cols
        tl.store(PART + out, mean, mask=cmask)
        tl.store(PART + tl.num_programs(1) * tl.num_programs(0) * C + out, tl.sum(d * d, axis=0), mask=cmask)
    elif STATS:
        start = tl.program_id(0) * RPP
        y, mask = _residual_rows(X, R, BIAS, Y, n, start + tl.arange(0, BLOCK_R), cols, cmask, HW_OUT, HW_R, W_R,
                                 W_OUT, C, HAS_BIAS, RESAMPLE)
        y = tl.where(mask, y, 0.0)
        k = tl.sum(y, axis=0) / tl.maximum(tl.sum(mask.to(tl.float32), axis=0), 1.0)
        d = tl.where(mask, y - k[None, :], 0.0)
        s1 = tl.sum(d, axis=0)
        s2 = tl.sum(d * d, axis=0)
        for r0 in tl.range(BLOCK_R, RPP, BLOCK_R, num_stages=STAGES):
            y, mask = _residual_rows(X, R, BIAS, Y, n, start + r0 + tl.arange(0, BLOCK_R), cols, cmask, HW_OUT,
                                     HW_R, W_R, W_OUT, C, HAS_BIAS, RESAMPLE)
            d = tl.where(mask, y - k[None, :], 0.0)
            s1 += tl.sum(d, axis=0)
            s2 += tl.sum(d * d, axis=0)
        cnt = tl.minimum(RPP, HW_OUT - start).to(tl.float32)
        out = (n * tl.num_programs(0) + tl.program_id(0)) * C + cols
        tl.store(PART + out, k + s1 / cnt, mask=cmask)
        tl.store(PART + tl.num_programs(1) * tl.num_programs(0) * C + out, tl.maximum(s2 - s1 * s1 / cnt, 0.0),
                 mask=cmask)
    else:
        _residual_rows(X, R, BIAS, Y, n, tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R), cols, cmask, HW_OUT,
                       HW_R, W_R, W_OUT, C, HAS_BIAS, RESAMPLE)


@triton.jit
def _mma(a, b, acc, F32: tl.constexpr):
    """acc + a @ b. F32: in IEEE float32 (float32 inputs: no TF32; bfloat16 in Triton's
    interpreter, whose dot does not take it), else on the tensor cores in the inputs' precision."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gemm_part(acc, X, K, K0, WT, CO, rm, rn, mmask, nmask, BLOCK_K: tl.constexpr, F32: tl.constexpr):
    """acc += X[rm, 0:K] @ WT[K0:K0 + K, rn] (X: [M, K] rows, WT: the weight transposed, [C_in, C_out]);
    F32 as in ``_mma``."""
    for k in range(0, K, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        kmask = rk < K
        a = tl.load(X + rm[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(WT + (K0 + rk)[:, None] * CO + rn[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _mma(a, b, acc, F32)
    return acc


@triton.jit
def _gemm_cat(acc, X, X2, C1, C2, WT, CO, rm, rn, mmask, nmask, BLOCK_K: tl.constexpr, F32: tl.constexpr):
    """acc += [X | X2][rm, :] @ WT[:, rn] as one loop over both parts' K tiles (X: [M, C1] rows,
    X2: [M, C2]): one software pipeline across the concatenation, where ``_gemm_part`` twice
    drains the first part's pipeline before the second's loads start (at the 256x256 model's
    level 0, 4 + 4 tiles of 64 channels: half of each loop is its fill and drain)."""
    t1 = tl.cdiv(C1, BLOCK_K)
    for t in range(0, t1 + tl.cdiv(C2, BLOCK_K)):
        second = t >= t1
        width = tl.where(second, C2, C1)
        rk = tl.where(second, t - t1, t) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = rk < width
        a = tl.load(tl.where(second, X2, X) + rm[:, None] * width + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(WT + (tl.where(second, C1, 0) + rk)[:, None] * CO + rn[None, :],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _mma(a, b, acc, F32)
    return acc


@triton.jit
def skip_add(X, X2, WT, H, BIAS, Y, PART, M, C1, C2, CO, TWO: tl.constexpr, F32: tl.constexpr, STATS: tl.constexpr,
             ONE_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y = h + bias + W [x; x2]: a residual block's closing add with its 1x1 skip conv, over the
    # channels_last pixel rows ([M, C] matrices), with the decoder's cat(x, x2) read in place.
    # One program per (row tile, output-channel tile), the channel tiles of a row tile adjacent in
    # launch order, so the second one finds its rows of x in L2. STATS: also each row tile's
    # per-channel mean and M2 of y as stored (rounded), PART [2, M / BLOCK_M, CO], the blocks of
    # the next norm's statistics (each tile inside one sample: the host checks that BLOCK_M divides
    # the pixels per sample), so that norm never reads y for them.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(CO, BLOCK_N)
    rm = ((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < CO
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ONE_LOOP and TWO:
        acc = _gemm_cat(acc, X, X2, C1, C2, WT, CO, rm, rn, mmask, nmask, BLOCK_K, F32)
    else:
        acc = _gemm_part(acc, X, C1, 0, WT, CO, rm, rn, mmask, nmask, BLOCK_K, F32)
        if TWO:
            acc = _gemm_part(acc, X2, C2, C1, WT, CO, rm, rn, mmask, nmask, BLOCK_K, F32)
    off = rm[:, None] * CO + rn[None, :]
    mask = mmask[:, None] & nmask[None, :]
    acc += tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(Y.dtype.element_ty)
    tl.store(Y + off, y, mask=mask)
    if STATS:
        _tile_statistics(y, PART + (pid // tiles_n) * CO + rn, (M // BLOCK_M) * CO, nmask, BLOCK_M)


@triton.jit
def _tile_statistics(y, OUT, PLANE, nmask, BLOCK_M: tl.constexpr):
    """A GEMM epilogue's statistics block: the per-channel mean and M2 over the BLOCK_M rows of
    the stored (rounded) tile y, to OUT and OUT + PLANE (PART's two planes)."""
    yf = y.to(tl.float32)
    mean = tl.sum(yf, axis=0) / BLOCK_M
    d = yf - mean[None, :]
    tl.store(OUT, mean, mask=nmask)
    tl.store(OUT + PLANE, tl.sum(d * d, axis=0), mask=nmask)


@triton.jit
def conv_in(X, WK, BIAS, Y, PART, SN, SC, SH, SW, H, W, C, CO, KH: tl.constexpr, KW: tl.constexpr,
            F32: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    # y = conv(x) + bias for the network's input conv, whose few input channels (3, or 6 for an
    # upsampler) make its whole receptive field one short GEMM row: K = KH * KW * C (27 or 54),
    # padded to BLOCK_K, tap-major (k = (i * KW + j) * C + c, WK: [BLOCK_K, CO], zero rows past
    # K). Program (row tile, channel tile) of sample n gathers its pixels' fields from x (strides
    # SN, SC, SH, SW, zero outside the image: 'same' padding) and writes y channels_last, [HW, CO]
    # per sample. Nearly all its bytes are the output's, which STATS also reduces per row tile
    # (as skip_add's: PART [2, N, HW / BLOCK_M, CO], BLOCK_M dividing HW) for the first norm.
    pid = tl.program_id(0)
    n = tl.program_id(1)
    tiles_n = tl.cdiv(CO, BLOCK_N)
    tile_m = pid // tiles_n
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    hw = H * W
    mmask = rm < hw
    nmask = rn < CO
    rk = tl.arange(0, BLOCK_K)
    tap = rk // C
    ch = rk % C
    yy = (rm // W)[:, None] + (tap // KW - KH // 2)[None, :]
    xx = (rm % W)[:, None] + (tap % KW - KW // 2)[None, :]
    inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W) & mmask[:, None] & (rk < KH * KW * C)[None, :]
    a = tl.load(X + n.to(tl.int64) * SN + (ch[None, :] * SC + yy * SH + xx * SW), mask=inside, other=0.0)
    b = tl.load(WK + rk[:, None] * CO + rn[None, :], mask=nmask[None, :], other=0.0)
    if F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b)
    acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(Y.dtype.element_ty)
    mask = mmask[:, None] & nmask[None, :]
    tl.store(Y + n.to(tl.int64) * hw * CO + (rm[:, None] * CO + rn[None, :]), y, mask=mask)
    if STATS:
        tiles = hw // BLOCK_M
        _tile_statistics(y, PART + (n * tiles + tile_m) * CO + rn, tl.num_programs(1) * tiles * CO, nmask, BLOCK_M)
