"""ADM's U-Net and noisy-image classifier, built from a config (``config.py``).

``UNet(cfg)(x_t, t, y=None, low_res=None)`` returns the model output [N, 3 or 6, H, W]:
eps_theta(x_t, t, y), then (with ``learn_sigma``) the interpolation weight v of the variance.
``Classifier(cfg)(x_t, t)`` returns the logits of p_phi(y | x_t, t).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import fused, layers
from .config import AnyConfig, ClassifierConfig, UNetConfig
from .layers import (AttentionBlock, AttentionPool2d, EmbedSequential, GroupNorm32, ResBlock, Upsample,
                     block_embeddings, build_encoder, derived, middle_block, time_embed, timestep_embedding)


class LabelEmbedding(nn.Embedding):
    """nn.Embedding for the class label y, whose random init is skipped on the meta device.

    ``weights.load_model`` builds the network on "meta" and assigns the file's tensors. There,
    nn.Embedding's normal_ init runs torch's Python decomposition, which imports torch._dynamo,
    torch._inductor and sympy: ~3 s of every class-conditional ``adm sample`` on a CPU, for
    values that are then thrown away."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class UNet(nn.Module):
    """The ADM U-Net (class-conditional, unconditional or super-resolution)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, mults, emb_ch = cfg.num_channels, cfg.mults, 4 * cfg.num_channels
        legacy = not cfg.use_new_attention_order
        common = dict(scale_shift=cfg.use_scale_shift_norm, dropout=cfg.dropout)
        self.time_embed = time_embed(mc)
        if cfg.class_cond:
            self.label_emb = LabelEmbedding(cfg.num_classes, emb_ch)
        in_ch = cfg.in_channels * (2 if cfg.is_super_res else 1)
        self.input_blocks, skips, ds = build_encoder(
            in_channels=in_ch, model_channels=mc, mults=mults, num_res_blocks=cfg.num_res_blocks,
            attention_ds=cfg.attention_ds, heads=cfg.heads, emb_channels=emb_ch,
            updown=cfg.resblock_updown, legacy_order=legacy, **common)
        ch = skips[-1]
        self.middle_block = middle_block(ch, emb_ch, cfg.heads(ch), legacy_order=legacy, **common)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                out = int(mult * mc)
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), emb_ch, out, **common)]
                ch = out
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.heads(ch, upsample=True), legacy))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, up=True, **common) if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_embed(_embedding_in(self.time_embed, t, self.config.num_channels))
        if self.config.class_cond:
            if y is None:
                raise ValueError("this model is class-conditional: pass class labels y")
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                low_res: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, y)
        if self.config.is_super_res:
            if low_res is None:
                raise ValueError("this is a super-resolution model: pass low_res")
            x = torch.cat([x, F.interpolate(low_res, x.shape[-2:], mode="bilinear")], dim=1)
        dtype = self.out[2].weight.dtype  # activations follow the weights (float32, or bf16/fp16 fast path)
        h, emb = x.to(dtype, memory_format=_memory_format(self.input_blocks)), emb.to(dtype)
        fused_path = self.out[0].fused
        if fused_path:  # all blocks' embedding projections in one GEMM
            emb = block_embeddings(self, emb)
        # (fused: each skip's statistics, taken in the encoder, are reused by its decoder block)
        with fused.shared_statistics() if fused_path and layers.SHARED_STATS else contextlib.nullcontext():
            hs = []
            for i, block in enumerate(self.input_blocks):
                h = _input_conv(block[0], h, fused_path) if i == 0 else block(h, emb)
                hs.append(h)
            h = self.middle_block(h, emb)
            for block in self.output_blocks:
                h = block(h, emb, skip=hs.pop())  # on cat([h, skip], 1), concatenated only where needed
            norm, _, conv = self.out
            h = norm.act(h)
        if norm.fused and layers.PAD_IO:  # (see layers.PAD_IO)
            w, b = derived(conv, "padded", (conv.weight, conv.bias), lambda: fused.out_weight(conv))
            h = fused.conv_out(h, w, b, conv.out_channels, conv.padding)
        else:
            h = conv(h)
        # Back to plain NCHW: the samplers' arithmetic and callers see the usual layout.
        return h.to(x.dtype if x.dtype.is_floating_point else torch.float32).contiguous()


class Classifier(nn.Module):
    """The noisy-image classifier: the U-Net's encoder and middle block, then attention pooling."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        mc, emb_ch = cfg.classifier_width, 4 * cfg.classifier_width
        heads = lambda ch: ch // cfg.num_head_channels  # noqa: E731 - the classifier fixes d = 64
        common = dict(scale_shift=cfg.classifier_use_scale_shift_norm)
        self.time_embed = time_embed(mc)
        self.input_blocks, skips, ds = build_encoder(
            in_channels=cfg.in_channels, model_channels=mc, mults=cfg.mults, num_res_blocks=cfg.classifier_depth,
            attention_ds=cfg.attention_ds, heads=heads, emb_channels=emb_ch,
            updown=cfg.classifier_resblock_updown, legacy_order=True, **common)
        ch = skips[-1]
        self.middle_block = middle_block(ch, emb_ch, heads(ch), legacy_order=True, **common)
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(),
            AttentionPool2d(cfg.image_size // ds, ch, cfg.num_head_channels, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(_embedding_in(self.time_embed, t, self.config.classifier_width))
        dtype = self.out[2].c_proj.weight.dtype
        h, emb = x.to(dtype, memory_format=_memory_format(self.input_blocks)), emb.to(dtype)
        if self.out[0].fused:
            emb = block_embeddings(self, emb)
        for i, block in enumerate(self.input_blocks):
            h = _input_conv(block[0], h, self.out[0].fused) if i == 0 else block(h, emb)
        h = self.middle_block(h, emb)
        return _head(self.out, h).float()


def _input_conv(conv: nn.Conv2d, x: torch.Tensor, fused_path: bool) -> torch.Tensor:
    """The first conv; on the fused GPU path a direct Triton conv where nothing needs its gradient
    (``fused.conv_in_direct``, ``layers.DIRECT_IN``), else cuDNN's with its input padded and its
    bias as weights (``fused.conv_in``); see ``layers.PAD_IO``."""
    if fused_path and layers.PAD_IO:
        grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
        if layers.DIRECT_IN and not grad and fused.gemm_runs(conv.weight):
            matrix, bias = derived(conv, "matrix", (conv.weight, conv.bias), lambda: fused.in_matrix(conv))
            return fused.conv_in_direct(x, matrix, bias, conv.kernel_size, stats=layers.IN_STATS)
        return fused.conv_in(x, derived(conv, "padded", (conv.weight, conv.bias), lambda: fused.in_weight(conv)),
                             conv.padding)
    return conv(x)


def _head(out: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """out = Sequential(GroupNorm, SiLU, layer): the norm and SiLU as one op (fused on GPU)."""
    return out[2](out[0].act(h))


def _embedding_in(time_embed: nn.Sequential, t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding (always computed in float32) in the dtype of ``time_embed``."""
    return timestep_embedding(t, dim).to(time_embed[0].weight.dtype)


def _memory_format(blocks: nn.ModuleList) -> torch.memory_format:
    """channels_last when the weights were converted to it (``fast.prepare``), else NCHW.

    The input conv decides: its weight [C, in, 3, 3] is channels_last-contiguous only after
    ``module.to(memory_format=torch.channels_last)``. Feeding the activations in the same layout
    keeps every conv, norm and attention block in it (no per-layer reorders).
    """
    w = blocks[0][0].weight
    return torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format


def build_model(cfg: AnyConfig) -> UNet | Classifier:
    """Instantiate the network a config describes (random weights)."""
    return Classifier(cfg) if isinstance(cfg, ClassifierConfig) else UNet(cfg)


def set_exact_attention(model: nn.Module, exact: bool = True) -> nn.Module:
    """Switch every attention layer between the reference's arithmetic and the fused kernel."""
    for m in model.modules():
        if isinstance(m, (AttentionBlock, AttentionPool2d)):
            m.exact = exact
    return model
