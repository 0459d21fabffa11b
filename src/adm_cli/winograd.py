"""Winograd F(4x4, 3x3) convolution: the CPU float32 path's wide 3x3 convolutions.

Notation (Lavin & Gray, *Fast Algorithms for Convolutional Neural Networks*, 2016): a 4x4 block
of a 3x3 convolution's output, for one input and one output channel, is

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A

with g the 3x3 kernel, d the 6x6 input tile around the block (tiles overlap by 2) and the
transforms below (interpolation points 0, 1, -1, 2, -2 and infinity). Summed over input
channels, the elementwise product becomes 36 independent matrix products, one per position
(i, j) of the 6x6 transformed tile:

    M[ij] = V[ij] @ U[ij],   V[ij]: [tiles, C] (transformed input),  U[ij]: [C, O] (transformed weights)

That is 36 multiply-adds per 16 outputs and (C, O) pair instead of 144: 4x fewer. The
transforms are additions over the tiles (memory-bound), so the gain is real only when C and O
are wide enough for the products to dominate. On this project's 2-core CPU, in the 64x64
model at batch 4, a conv takes 1/1.7 to 1/2.7 of the time of oneDNN's direct one at the 64x64,
32x32 and 16x16 levels, 1/1.1 to 1/1.4 at 8x8 (``benchmarks/cpu_convs.py`` times each shape;
see ``worth_it``).

Precision: the transforms are exact in float64 (the tests check that); the float32 rounding
of V and M costs ~3x the error of a direct convolution (max |error| / max |output|
~1e-5 against ~2e-6 per conv, measured on random weights), far below one uint8 level. cuDNN,
and oneDNN on AVX-512 CPUs, offer the same algorithm for float32 convolutions.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

# B^T (6x6), G (6x3), A^T (4x6) for F(4, 3). Rows of B^T and G, and columns of A^T, belong to
# the points 0, 1, -1, 2, -2 and the point at infinity (the last one).
_BT = ((4, 0, -5, 0, 1, 0),
       (0, -4, -4, 1, 1, 0),
       (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0),
      (-1 / 6, -1 / 6, -1 / 6),
      (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6),
      (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0),
       (0, 1, -1, 2, -2, 0),
       (0, 1, 1, 4, 4, 0),
       (0, 1, -1, 8, -8, 1))

TILE = 4  # outputs per tile side (m); the input tile is m + 2 = 6

# When the transforms pay (see ``worth_it``): both channel counts wide enough for the products
# to dominate the transforms' memory traffic, and enough tiles to amortise reading U (4x the
# bytes of the 3x3 weights) on every call.
MIN_CHANNELS = 128
MIN_TILES = 16


def matrices(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B^T, G, A^T) as tensors."""
    return tuple(torch.tensor(m, dtype=dtype) for m in (_BT, _G, _AT))


@functools.lru_cache(maxsize=None)
def _tile_transforms(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """B^T ⊗ B^T [36, 36] and A^T ⊗ A^T [16, 36]: both 2-D transforms as one matrix each, acting
    on a tile flattened row by row (the Kronecker product of the 1-D transforms)."""
    bt, _, at = matrices()
    return torch.kron(bt, bt).to(dtype), torch.kron(at, at).to(dtype)


def transform_weight(w: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> U = G g G^T as [36, C, O], in w's dtype.

    One product with G ⊗ G [36, 9] over the flattened kernels. In float32 its rounding (~3e-8
    of U's largest value against float64) is nothing beside the algorithm's (~1e-5), and it
    takes ~3.5 s for the whole 64x64 U-Net instead of ~15 s in float64.
    """
    o, c = w.shape[:2]
    _, g, _ = matrices()
    flat = w.detach().transpose(0, 1).reshape(c * o, 9)  # kernels in (C, O) order: U comes out [36, C, O]
    return torch.mm(torch.kron(g, g).to(w.dtype), flat.T).view(36, c, o)


def applies(conv: torch.nn.Conv2d) -> bool:
    """A 3x3 convolution with stride 1, padding 1, no dilation or groups: the only kind here."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def worth_it(x_shape: tuple[int, ...], out_channels: int) -> bool:
    """Whether ``conv3x3`` is expected to beat oneDNN's direct convolution (CPU, float32).

    Measured per shape with ``benchmarks/cpu_convs.py`` on a 2-core AMD EPYC (AVX2), the 64x64
    U-Net at batch 4 (medians of 7): 64x64, 32x32 and 16x16 levels 1.7-2.7x (384 -> 384
    channels at 32x32: 77 -> 33 ms); 8x8 (16 tiles) 1.1-1.4x; the input conv (3 channels) and
    the output conv (6) 4-6x slower. At batch 1 the 8x8 level (4 tiles) is 2x slower: reading U
    dominates. The rule picked the faster form for every shape at batch 4 and at batch 1. H and
    W must be multiples of the tile. Not measured on AVX-512 machines, where oneDNN's direct
    convolutions are faster and the balance may differ (``ADM_WINOGRAD=0`` to compare).
    """
    n, c, h, w = x_shape
    if h % TILE or w % TILE:
        return False
    return min(c, out_channels) >= MIN_CHANNELS and n * (h // TILE) * (w // TILE) >= MIN_TILES


class _Workspace(threading.local):
    """Per-thread scratch tensors for ``conv3x3``'s intermediates, grown to the largest call and
    kept; a name's buffer is handed out again once its last contents are spent. A fresh tensor
    of tens of MB comes from the C allocator as new pages, whose first
    touch costs more than the copy itself (the tile gather at 64x64, 192 channels: 12 ms into a
    fresh tensor, 2.4 ms into a used one). Per thread, so that models run from several threads
    never share one."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            # An ordinary tensor even when made under inference_mode: one made there could not be
            # written by a later call outside it, whereas an ordinary one may be written in both.
            with torch.inference_mode(False):
                buf = self.buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's scratch tensors (they come back, at their size, on the next call)."""
    _WORKSPACE.buffers.clear()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, g, bias, padding=1) by F(4x4, 3x3), with u = ``transform_weight(g)``.

    x: [N, C, H, W] in channels_last (read as NHWC), H and W multiples of 4. Returns
    [N, O, H, W] in channels_last. The intermediates live in a per-thread workspace (for the
    64x64 U-Net at batch 4, ~210 MB held after the first forward; ``release_workspace``).
    """
    n, c, h, w = x.shape
    o = u.shape[2]
    th, tw = h // TILE, w // TILE
    tiles = n * th * tw
    bb, aa = _tile_transforms(x.dtype)
    ws = _WORKSPACE
    # The input with its zero border of 1, NHWC.
    xp = ws.get("a", (n, h + 2, w + 2, c), x)
    for border in (xp[:, 0], xp[:, -1], xp[:, :, 0], xp[:, :, -1]):
        border.zero_()
    xp[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    # The 6x6 tiles d (stride 4, overlapping), gathered as [tiles, 36, C]; then V = B^T d B for
    # all of them at once, as [tiles, 36, C] -> read as [36, tiles, C] by the products.
    s = xp.stride()
    d = ws.get("b", (n, th, tw, 6, 6, c), x)
    d.copy_(xp.as_strided((n, th, tw, 6, 6, c), (s[0], TILE * s[1], TILE * s[2], s[1], s[2], s[3])))
    v = torch.matmul(bb, d.view(tiles, 36, c), out=ws.get("c", (tiles, 36, c), x))
    # [36, tiles, O]: the 36 products M[ij] = V[ij] U[ij] (into d's buffer: d is spent)
    m = torch.bmm(v.transpose(0, 1), u, out=ws.get("b", (36, tiles, o), x))
    # A^T M A: [16, tiles * O], the 4x4 outputs of every tile (into the padded input's buffer)
    y = torch.mm(aa, m.view(36, -1), out=ws.get("a", (16, tiles * o), x))
    out = x.new_empty(n, h, w, o)
    y = y.view(TILE, TILE, n, th, tw, o).permute(2, 3, 0, 4, 1, 5)  # -> [N, th, 4, tw, 4, O]
    if bias is None:
        out.view(n, th, TILE, tw, TILE, o).copy_(y)
    else:
        torch.add(y, bias, out=out.view(n, th, TILE, tw, TILE, o))
    return out.permute(0, 3, 1, 2)
