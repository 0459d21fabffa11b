"""Building blocks of ADM's U-Net and classifier (Dhariwal & Nichol 2021, section 3).

Parameter names and shapes follow OpenAI's guided-diffusion exactly (``in_layers.0``,
``emb_layers.1``, ``qkv`` as a 1x1 Conv1d, ...), so its state dicts load with ``strict=True``.
Notation: C channels, H heads of d = C / H channels, T = h * w tokens, emb the timestep (+ class)
embedding of width 4 * model_channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups whose statistics are always taken in float32.

    Half-precision activations lose too much in the variance; the reference upcasts the same way.
    """

    def __init__(self, channels: int):
        super().__init__(32, channels)
        self.fused = False  # set by fast.prepare on CUDA: the Triton kernels of fused.py

    def act(self, x: torch.Tensor, act: bool = True, **affine) -> torch.Tensor:
        """SiLU(self(x)) (``act``) or self(x), through the fused kernel when ``fused`` is set.
        ``affine`` (fused only): in_bias / scale / shift / resample, see ``fused.group_norm_act``."""
        if self.fused:
            return fused.group_norm_act(x, self.weight, self.bias, self.eps, act=act, **affine)
        return F.silu(self(x)) if act else self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype != torch.float32 and NATIVE_HALF_GROUPNORM:
            # CUDA's GroupNorm kernel already accumulates half inputs in float32; calling it on
            # the half tensor skips the two full-size casts (read + write of a float32 copy).
            return F.group_norm(x, 32, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        if CENTRED_GN and not x.is_cuda and x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            return _group_norm_nhwc(x.float(), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        return F.group_norm(x.float(), 32, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


# The first pass's eps, E: large against any group's variance, so that the second pass's eps of
# eps / E adds eps * (var~ + E) / E = eps (1 + var~ / E) to the variance, i.e. eps itself.
_CENTRE_EPS = 1e4


def _group_norm_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm of a channels_last float32 tensor on the CPU, as accurate as the NCHW kernel.

    Why: torch's channels_last CPU kernel sums x and x^2 in float32 in one sweep and takes
    var = E[x^2] - E[x]^2, which loses ~(mean/std)^2 x the sums' rounding: 3e-4 relative at a
    group mean of 20 std over 64x64 pixels, 1e-2 at 100 std (the NCHW kernel: ~1e-6). So the
    first pass only centres: (x - mu~) / sqrt(var~ + E) has a group mean of (mu - mu~) / sqrt(var~ + E),
    tiny against its spread, where E[y^2] - E[y]^2 loses nothing; the second pass normalises that
    exactly, with eps / E standing for eps (see _CENTRE_EPS). Two passes of the fast kernel cost
    less than the layout copies around the NCHW one (measured: 3x the one pass vs ~10x)."""
    centred = F.group_norm(x, 32, None, None, _CENTRE_EPS)
    return F.group_norm(centred, 32, weight, bias, eps / _CENTRE_EPS)


# Switch for benchmarks/bench.py (``--gn-upcast``): False restores the reference's explicit upcast.
NATIVE_HALF_GROUPNORM = True
# Switch for benchmarks/bench.py (``--set CENTRED_GN=off``): False gives channels_last CPU
# activations torch's one-pass GroupNorm (faster by ~2.5% of a forward, far less accurate: see
# _group_norm_nhwc).
CENTRED_GN = True
# Switch for benchmarks/bench.py (``--concat``): False makes the fused decoder blocks concatenate
# their input and skip again (torch.cat) instead of reading both in place.
FUSED_CONCAT = True
# Switches for benchmarks/bench.py (``--set NAME=VALUE``), each a part of the fused GPU path:
# FUSED_SKIP: the closing add of a block with a 1x1 skip conv as one GEMM (``fused.skip_add``)
# rather than cuBLAS GEMMs and a separate add. UP_CONV: how an up block's first conv runs,
# "transposed" (the nearest upsample folded into a stride-2 transposed conv, ``fused.conv_up``)
# or "plain" (the norm writes the upsampled tensor, a 3x3 conv reads it). PAD_IO: the network's
# input conv with its few channels padded and its bias as weights, its output conv padded to 8
# outputs (``fused.conv_in`` / ``fused.conv_out``), rather than cuDNN's kernels for 3 and 6
# channels and a separate bias pass.
# SHARED_STATS: the decoder's first norms reuse the statistics of their skip connection that the
# encoder's norms took (``fused.shared_statistics``) rather than reading the skip again.
# SKIP_STATS / IN_STATS / RESIDUAL_STATS: there, ``fused.skip_add`` / the direct input conv / the
# closing residual add (``add_bias``) also hand their output's statistics to the next norm. The
# last two are off: on an H200 (session 14, benchmarks/NOTES.md) their epilogues cost more than
# the statistics pass they spare (the 256x256 model's residual adds 7.5 ms per forward with their
# statistics against 2.8 + 2.0 without; the input conv 0.87 against 0.32 + 0.31), while
# skip_add's pays (5.6 against 4.8 + 1.8).
# DIRECT_IN (under PAD_IO): the input conv, where no gradient is taken through it, as a direct
# Triton conv (``fused.conv_in_direct``) rather than cuDNN's over the padded input.
FUSED_SKIP = True
UP_CONV = "transposed"
PAD_IO = True
SHARED_STATS = True
SKIP_STATS = True
IN_STATS = False
RESIDUAL_STATS = False
DIRECT_IN = True


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim / 2)), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class EmbedSequential(nn.Sequential):
    """A Sequential whose residual blocks also receive the embedding; ``skip`` (the U-Net
    decoder's skip connection) goes to the first block, which takes cat([x, skip], 1)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor,  # type: ignore[override]
                skip: torch.Tensor | None = None) -> torch.Tensor:
        for i, layer in enumerate(self):
            if isinstance(layer, ResBlock):
                x = layer(x, emb, skip if i == 0 else None)
            else:
                x = layer(x if i or skip is None else torch.cat([x, skip], dim=1))
        return x


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv (``op``), as ADM uses without resblock_updown."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then (optionally) a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return upsample_conv(self.conv, x)
        return F.interpolate(x, scale_factor=2, mode="nearest")


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(nearest-neighbour 2x upsample of x).

    A conv prepared by ``fast.prepare`` on CPU may provide ``upsampled(x)``, which computes the
    same thing at the low resolution with folded 2x2 kernels (2.25x fewer multiply-adds).
    """
    upsampled = getattr(conv, "upsampled", None)
    if upsampled is not None:
        return upsampled(x)
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block with the embedding injected after the second norm.

    With ``scale_shift`` (ADM's "adaptive group normalisation", AdaGN) the embedding gives
    (s, b) and h = GroupNorm(h) * (1 + s) + b; otherwise it is added before the norm.
    ``up`` / ``down`` resample both branches in the middle of the block (BigGAN-style).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 scale_shift: bool = True, dropout: float = 0.0, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = "up" if up else "down" if down else None
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``skip``: more input channels (the decoder's skip connection): the block's input is
        cat([x, skip], 1), which the fused path never writes out."""
        fused_path = self.in_layers[0].fused
        if skip is not None and not (fused_path and FUSED_CONCAT and isinstance(self.skip_connection, nn.Conv2d)):
            x, skip = torch.cat([x, skip], dim=1), None
        if fused_path:
            return self._forward_fused(x, emb, skip)
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.resample == "up":
            h, x = upsample_conv(conv, h), self._resample(x)
        else:
            if self.resample:
                h, x = self._resample(h), self._resample(x)
            h = conv(h)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, act, drop, conv = self.out_layers
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, norm(h), 1 + scale)
        else:
            h = norm(h + e)
        return self.skip_connection(x) + conv(drop(act(h)))

    def _forward_fused(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The same block on the GPU fast path: both convs run without their bias, which the
        fused norm after the first and the closing residual add of the second take in, so
        between the two convolutions there is one fused op (stats read, one read + one write).
        With ``skip`` the first norm and the 1x1 skip conv read x and skip in place (no concat)."""
        norm, _, conv1 = self.in_layers
        extra = {} if skip is None else {"x2": skip}
        if self.resample == "up" and UP_CONV == "transposed" and skip is None:
            h = fused.conv_up(norm.act(x), derived(conv1, "up_weight", (conv1.weight,),
                                                   lambda: fused.up_weight(conv1)))
        else:
            h = fused.conv_nobias(conv1, norm.act(x, resample=self.resample, **extra))  # output written resampled
        if isinstance(emb, BlockEmbeddings):
            e = emb.of(self)
        else:
            _, emb_linear = self.emb_layers  # (called directly: module calls are host time here)
            e = F.linear(F.silu(emb), emb_linear.weight, emb_linear.bias)  # read by the kernels in its own dtype
        norm, _, _, conv = self.out_layers
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = norm.act(h, in_bias=conv_bias(conv1, h), scale=scale, shift=shift)
        else:
            h = norm.act(h, in_bias=e.float() + conv_bias(conv1, h).float())
        h = fused.conv_nobias(conv, h)
        if isinstance(self.skip_connection, nn.Conv2d):  # never with up/down (same channels)
            if FUSED_SKIP and fused.gemm_runs(h) and not (torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (x, skip, h))):  # (the GEMM has no backward)
                w_t = derived(self.skip_connection, "weight_t", (self.skip_connection.weight,),
                              lambda: fused.skip_weight(self.skip_connection))
                return fused.skip_add(h, x, skip, w_t, self._closing_bias(h), stats=SKIP_STATS)
            if skip is None:
                x = fused.conv_nobias(self.skip_connection, x)
            else:
                x = fused.conv1x1_cat(self.skip_connection, x, skip)
        return fused.add_bias(h, x, self._closing_bias(h), resample=self.resample,  # skip resampled on the fly
                              stats=RESIDUAL_STATS)

    def _closing_bias(self, like: torch.Tensor) -> torch.Tensor:
        """The bias of the closing add: the second conv's, plus the 1x1 skip conv's if there is
        one. That sum is taken once and kept, not on every step (the fast path's parameters are
        frozen); it is taken again if either bias moves or is written in place."""
        conv, skip = self.out_layers[3], self.skip_connection
        if not isinstance(skip, nn.Conv2d):
            return conv_bias(conv, like)
        return derived(self, "bias_sum", (conv.bias, skip.bias),
                       lambda: conv_bias(conv, like) + conv_bias(skip, like))


class BlockEmbeddings:
    """Every residual block's projection of the embedding, emb_layers(emb) = W SiLU(emb) + b, for
    one forward of a network on the fused path, computed as one GEMM over the blocks' stacked
    weights (``block_embeddings``) instead of a SiLU and a small GEMM per block: on an H100 the
    256x256 U-Net's 42 blocks launched 84 kernels per step for 0.3 ms of GPU work, plus the gaps
    between them that CUDA graphs keep. ``of(block)``: that block's [N, C_e] slice (a view)."""

    __slots__ = ("table", "columns")

    def __init__(self, table: torch.Tensor, columns: dict):
        self.table, self.columns = table, columns

    def of(self, block: nn.Module) -> torch.Tensor:
        start, stop = self.columns[id(block)]
        return self.table[:, start:stop]


def block_embeddings(model: nn.Module, emb: torch.Tensor) -> BlockEmbeddings:
    """``BlockEmbeddings`` of ``model``'s residual blocks for the embedding ``emb`` [N, E]. The
    stacked weight is a second copy of the blocks' projections (5-7% of a network's weights),
    kept on the model and made again if any of them changes."""
    cache = _cache(model)
    if "linears" not in cache:  # (the module tree is fixed once built)
        blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
        linears = [b.emb_layers[1] for b in blocks]
        cache["linears"] = (blocks, linears, tuple(p for lin in linears for p in (lin.weight, lin.bias)))
    blocks, linears, params = cache["linears"]

    def stack():
        columns, start = {}, 0
        for b, lin in zip(blocks, linears):
            columns[id(b)] = (start, start + lin.out_features)
            start += lin.out_features
        return (torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears]), columns)

    weight, bias, columns = derived(model, "emb_stack", params, stack)
    return BlockEmbeddings(F.linear(F.silu(emb), weight, bias), columns)


class _Derived(dict):
    """A module's cache of ``derived`` values: never copied or pickled (a copy makes its own on
    first use; the originals may sit on another device), dropped by ``fast.prepare``."""

    def __deepcopy__(self, memo):
        return _Derived()

    def __reduce__(self):
        return (_Derived, ())


def _cache(module: nn.Module) -> _Derived:
    cache = module.__dict__.get("_derived")
    if cache is None:
        cache = module.__dict__["_derived"] = _Derived()  # (not a buffer, not in state_dict)
    return cache


def forget_derived(model: nn.Module) -> None:
    """Drop every ``derived`` value kept on ``model``'s modules (``fast.prepare`` does, before it
    converts the weights)."""
    for m in model.modules():
        m.__dict__.pop("_derived", None)


def derived(module: nn.Module, name: str, sources: tuple, make):
    """``make()``, a value computed from the parameters ``sources`` (a bias sum, a weight
    transposed, folded or padded for a fused op), kept on ``module`` under ``name`` and made again
    when any source is replaced, converted or written in place. The fast path's parameters are
    frozen, so this runs once, not on every step. (CUDA graphs replay the values they captured:
    change weights only through ``fast.prepare``, which drops both.)"""
    key = tuple(version_key(t) for t in sources)
    cache = _cache(module)
    kept = cache.get(name)  # (sources, key, value)
    if kept is None or any(a is not b for a, b in zip(kept[0], sources)) or kept[1] != key:
        kept = cache[name] = (sources, key, make())
    return kept[2]


def version_key(t: torch.Tensor | None) -> tuple:
    """What identifies a parameter's current values cheaply: its storage, dtype and in-place
    version. Tensors made under ``torch.inference_mode`` (weights loaded there) have no version
    counter; they are identified by storage alone (an in-place write to them is not seen)."""
    if t is None:
        return (None,)
    try:
        return (t.data_ptr(), t.dtype, t._version)
    except RuntimeError:  # (``is_inference()`` can be False for such a parameter after a ``.to``)
        return (t.data_ptr(), t.dtype, None)


def conv_bias(conv: nn.Conv2d, like: torch.Tensor) -> torch.Tensor:
    """A conv's bias (zeros if it has none), for the fused ops that take it in."""
    return conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=like.device)


def qkv_attention(qkv: torch.Tensor, heads: int, legacy_order: bool, exact: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over tokens, for a packed [N, 3C, T] qkv -> [N, C, T].

    ``legacy_order``: the channels are grouped per head as (q, k, v) of that head (OpenAI's
    "legacy" order, every model but 64x64); otherwise all q, then all k, then all v. The order
    cannot be read off a checkpoint's shapes, so it comes from the config.
    ``exact`` reproduces the reference's arithmetic (q and k each scaled by d^-1/4, an explicit
    T x T matrix, softmax in float32); otherwise one fused scaled_dot_product_attention call.
    The blocks below call the fast variant on [N, T, C] tokens directly (no transposes).
    """
    n, width, t = qkv.shape
    d = width // (3 * heads)
    if not exact:
        q, k, v = _split_heads(qkv.transpose(1, 2), heads, legacy_order)
        return F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(n, heads * d, t)
    split = qkv.view(n, heads, 3, d, t) if legacy_order else qkv.view(n, 3, heads, d, t).transpose(1, 2)
    q, k, v = split.unbind(2)  # each [N, H, d, T]
    scale = d ** -0.25
    w = torch.einsum("nhct,nhcs->nhts", q * scale, k * scale)
    w = torch.softmax(w.float(), dim=-1).to(w.dtype)
    return torch.einsum("nhts,nhcs->nhct", w, v).reshape(n, heads * d, t)


def _split_heads(qkv: torch.Tensor, heads: int, legacy_order: bool) -> tuple[torch.Tensor, ...]:
    """[N, T, 3C] -> q, k, v as [N, H, T, d] views whose last (channel) stride is 1.

    The fused CPU and GPU attention kernels need that stride; the [N, 3C, T] layout of the
    reference (a Conv1d over tokens) would send them to the slow unfused fallback.
    """
    n, t, width = qkv.shape
    d = width // (3 * heads)
    split = qkv.view(n, t, heads, 3, d).transpose(2, 3) if legacy_order else qkv.view(n, t, 3, heads, d)
    return tuple(part.transpose(1, 2) for part in split.unbind(2))


def _linear(tokens: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A 1x1 Conv1d applied as a Linear to [N, T, C] tokens (same parameters, no copy of them)."""
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)


class AttentionBlock(nn.Module):
    """Self-attention over the h*w positions, with a residual connection.

    The fast path (``exact`` False) works on [N, T, C] tokens: with channels_last activations
    that is a free view of x, q/k/v come out with unit channel stride, and one fused
    scaled_dot_product_attention call never materialises the T x T matrix.
    """

    def __init__(self, channels: int, heads: int, legacy_order: bool = True):
        super().__init__()
        self.heads = heads
        self.legacy_order = legacy_order
        self.exact = False
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        if self.exact:
            flat = x.reshape(n, c, hh * ww)
            h = qkv_attention(self.qkv(self.norm(flat)), self.heads, self.legacy_order, exact=True)
            return (flat + self.proj_out(h)).reshape(n, c, hh, ww)
        tokens = self.norm.act(x, act=False).flatten(2).transpose(1, 2)  # [N, T, C]
        q, k, v = _split_heads(_linear(tokens, self.qkv), self.heads, self.legacy_order)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, hh * ww, c)
        # [N, T, C] -> [N, C, h, w]: a view, channels_last-strided, so the add keeps that layout.
        return x + _linear(h, self.proj_out).transpose(1, 2).view(n, c, hh, ww)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to all positions (classifier head)."""

    def __init__(self, spatial: int, channels: int, head_channels: int, out_channels: int):
        super().__init__()
        pos = torch.empty(channels, spatial ** 2 + 1)
        if not pos.is_meta:  # (on "meta", where load_model builds, the division would import torch._dynamo: ~2 s)
            pos = torch.randn(channels, spatial ** 2 + 1) / channels ** 0.5
        self.positional_embedding = nn.Parameter(pos)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.heads = channels // head_channels
        self.exact = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        if self.exact:
            # Every token attends (as in the reference) but only the pooled token is read out.
            h = qkv_attention(self.qkv_proj(x), self.heads, legacy_order=False, exact=True)
            return self.c_proj(h[:, :, :1])[:, :, 0]
        # Softmax rows are independent: only the pooled token's query is needed, so the
        # attention is 1 x T instead of T x T (same numbers, T times less work).
        tokens = x.transpose(1, 2)  # [N, T, C]
        c = tokens.shape[-1]
        w, b = self.qkv_proj.weight.squeeze(-1), self.qkv_proj.bias
        q = F.linear(tokens[:, :1], w[:c], b[:c])
        kv = F.linear(tokens, w[c:], b[c:])
        n, t, _ = kv.shape
        d = c // self.heads
        q = q.view(n, 1, self.heads, d).transpose(1, 2)
        k, v = kv.view(n, t, 2, self.heads, d).unbind(2)
        h = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # [N, H, 1, d]
        return F.linear(h.reshape(n, c), self.c_proj.weight.squeeze(-1), self.c_proj.bias)


def build_encoder(*, in_channels: int, model_channels: int, mults, num_res_blocks: int, attention_ds,
                  heads, emb_channels: int, scale_shift: bool, updown: bool, legacy_order: bool,
                  dropout: float = 0.0) -> tuple[nn.ModuleList, list[int], int]:
    """The downsampling half shared by the U-Net and the classifier.

    Returns the blocks, the channel count of each skip connection, and the final rate ds.
    """
    ch = int(mults[0] * model_channels)
    blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skips, ds = [ch], 1
    for level, mult in enumerate(mults):
        for _ in range(num_res_blocks):
            out = int(mult * model_channels)
            layers: list[nn.Module] = [ResBlock(ch, emb_channels, out, scale_shift, dropout)]
            ch = out
            if ds in attention_ds:
                layers.append(AttentionBlock(ch, heads(ch), legacy_order))
            blocks.append(EmbedSequential(*layers))
            skips.append(ch)
        if level != len(mults) - 1:
            down = ResBlock(ch, emb_channels, ch, scale_shift, dropout, down=True) if updown else Downsample(ch)
            blocks.append(EmbedSequential(down))
            skips.append(ch)
            ds *= 2
    return blocks, skips, ds


def middle_block(ch: int, emb_channels: int, heads: int, scale_shift: bool, legacy_order: bool,
                 dropout: float = 0.0) -> EmbedSequential:
    return EmbedSequential(
        ResBlock(ch, emb_channels, ch, scale_shift, dropout),
        AttentionBlock(ch, heads, legacy_order),
        ResBlock(ch, emb_channels, ch, scale_shift, dropout),
    )


def time_embed(model_channels: int) -> nn.Sequential:
    emb = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
