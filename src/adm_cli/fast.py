"""The fast inference path: precision, memory layout, compilation and batch size.

``prepare(model, device=..., dtype="auto", compile=False)`` turns a loaded U-Net or classifier
into its fast form *in place* (parameter names and shapes stay OpenAI's, so ``state_dict`` and
``strict=True`` loads keep working):

- attention through one fused ``scaled_dot_product_attention`` call (flash / memory-efficient
  kernels on GPU, the flash kernel on CPU) instead of an explicit T x T matrix;
- fp16 (or bf16) convolution and linear weights and activations on GPU, with the
  timestep/class embeddings and GroupNorm statistics kept in float32, as the
  reference's own fp16 mode does; the samplers' arithmetic stays float32. "auto" gives the U-Net
  float16 and the classifier bfloat16 (see ``AUTO_CUDA_CLASSIFIER_DTYPE``);
- on CUDA (compute capability 8.0+, Triton present, no ``compile``): the fused kernels of
  ``fused.py`` -- GroupNorm + AdaGN scale-shift + SiLU + the conv bias in one pass, the residual
  add with the next conv's bias and the BigGAN up/down resampling in another, a block's 1x1 skip
  conv and closing add as one GEMM, up blocks' first conv as a transposed conv at the low
  resolution, the input conv padded with its bias as weights, every block's embedding projection
  in one GEMM -- on channels_last activations, where cuDNN runs its fastest half-precision
  convolutions. Measured on an H200 (random weights, medians of 5): guided 512x512 step 234 ->
  104 ms (2.96x the reference's 307 ms), DDIM 256x256 145 -> 79 ms; on an H100 with this build
  and CUDA graphs: 92.6 ms (3.70x) and 69.5 ms (3.00x). ``ADM_FUSED=0`` turns them off;
- without them on GPU, GroupNorm called on the half-precision tensor (CUDA's kernel accumulates
  in float32) rather than through a float32 copy (345 vs 403 ms per guided 512x512 step), and
  NCHW activations, because that kernel reads NCHW only (NHWC cost 41% of the GPU time in layout
  copies: 345 -> 234 ms per guided 512x512 step when removed);
- channels_last (NHWC) on CPU too, where oneDNN runs its fastest convolutions in it, and under
  ``torch.compile``; the attention blocks read NHWC as [N, T, C] tokens for free;
- cuDNN autotuning (``cudnn.benchmark``) on CUDA: shapes are fixed for a whole run;
- parameters frozen (``requires_grad`` False): the classifier's input gradient then skips every
  weight-gradient computation and the activations kept only for them;
- on CPU (float32), U-Net convolutions with their weights reordered for oneDNN once
  (``PrepackedConv2d``) instead of on every call, and the wide 3x3 ones (both channel counts
  >= 128) by Winograd F(4x4, 3x3) (``winograd.py``): 4x fewer multiply-adds, ~3x the rounding
  error of a direct conv (still ~1e-5), transformed weights 4x the size of those convs' weights
  in RAM (3.3 GB for the 64x64 U-Net; kept off when that is over a quarter of the machine's RAM,
  or with ``ADM_WINOGRAD=0``). The 64x64 DDIM step at batch 4 on 2 cores: 1.33x -> 1.82-1.94x
  the reference's;
- optional ``torch.compile`` (``compile=True``, instead of the fused kernels): inductor fuses
  the same elementwise work with its own kernels. Its warm-up is paid on the first call of each
  new batch shape (and again for a smaller last batch). Measured on an H200: 64x64 + classifier
  at batch 64, 90 s of warm-up, then 61 ms per guided step (2.98x the reference; eager with the
  fused kernels is host-bound there, 90-136 ms); DDIM 256x256 at batch 16, 45 s, then 88 ms
  (eager fused: 79 ms); 512x512 + classifier at batch 8 (an earlier build), 147 s, then 148 ms.
  On this project's 2-core CPU: ~70 s for a tiny U-Net, ~280 s for the full 64x64 U-Net, with
  no faster steps afterwards. So it is off by default (``adm sample --compile`` turns it on).
  ``compile="reduce-overhead"`` also replays CUDA graphs (GPU only; ignored on CPU).

``exact=True`` keeps the reference's arithmetic (einsum attention, float32; on CPU also NCHW and
plain convolutions unless asked otherwise) for bit-level comparisons; it is what
``dtype="float32", exact=True`` means everywhere in the tests.

``prepare`` may be called again on a prepared model (another device, dtype or layout): it starts
from the plain modules, and drops CUDA graphs captured over the old weights. Weights loaded under
``torch.inference_mode`` are made ordinary tensors first (inference tensors have no version
counter, which the packed-weight caches read).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .environment import CPU_BATCH, check_env, cpu_batch_size, env_switch  # (CPU_BATCH, check_env: old names here)
from .errors import UsageError
from . import fused, layers, winograd
from .layers import GroupNorm32, version_key
from .models import Classifier, UNet, set_exact_attention

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# What "auto" picks on CUDA. float16, not bfloat16: the same tensor-core rate on every GPU that
# has both, and 3 more mantissa bits. Measured on CPU (tests/test_fast.py): model output error
# 0.2% (fp16) vs 1.5% (bf16) of float32; uint8 images after 10-25 DDIM steps of the trained demo
# model differ by at most 1 level (fp16, mean 0.02) vs 3 (bf16, mean 0.3), and on random weights
# by 2 vs ~17. ADM was trained and sampled by OpenAI in float16 (``--use_fp16 True``), so its
# activations fit fp16's range; GroupNorm statistics, the embeddings and the samplers'
# arithmetic stay float32 either way. Set this to torch.bfloat16 to prefer range over precision.
AUTO_CUDA_DTYPE = torch.float16
# ... but the classifier's *input gradient* came out far worse in float16 than in bfloat16 on an
# H200 (benchmarks/accuracy.py, random weights, relative error vs float32: 512x512 classifier
# 22% fp16 vs 4.4% bf16; 64x64 7.3% vs 3.0%; loss scaling and float32 GroupNorm did not change
# the fp16 figure, so it is not underflow in the backward). Both run at the same tensor-core
# rate, so "auto" gives the classifier bfloat16.
AUTO_CUDA_CLASSIFIER_DTYPE = torch.bfloat16


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str, *,
                  classifier: bool = False) -> torch.dtype:
    """The weight/activation dtype for ``device``: "auto" (or None) picks ``AUTO_CUDA_DTYPE`` on
    CUDA (``AUTO_CUDA_CLASSIFIER_DTYPE`` for a classifier) and float32 elsewhere (CPU, MPS: their
    half-precision convolutions are emulated or partial, slower than float32). Explicit names:
    float32/fp32, bfloat16/bf16, float16/fp16."""
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return AUTO_CUDA_CLASSIFIER_DTYPE if classifier else AUTO_CUDA_DTYPE
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UsageError(f"unsupported dtype {dtype} (choose float32, bfloat16 or float16)")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r} (choose auto, float32, bfloat16 or float16)") from None


def _keep_float32(model: nn.Module, device: torch.device, use_fused: bool) -> list[nn.Module]:
    """The small modules that stay float32 in half precision (as in the reference's fp16 mode):
    the timestep and class embeddings, whose sinusoids need the mantissa, and every GroupNorm's
    affine parameters (read once per call by the fused kernels) -- except for the unfused CUDA
    GroupNorm, which runs on the half tensor (``layers.NATIVE_HALF_GROUPNORM``) and would
    otherwise cast them on every call."""
    native = device.type == "cuda" and layers.NATIVE_HALF_GROUPNORM and not use_fused
    keep = [] if native else [m for m in model.modules() if isinstance(m, GroupNorm32)]
    for name in ("time_embed", "label_emb"):
        if hasattr(model, name):
            keep.append(getattr(model, name))
    return keep


def use_fused_kernels(device: torch.device | str, *, compile: bool | str = False, exact: bool = False) -> bool:
    """Whether ``prepare`` turns the fused GroupNorm kernels on by default: a CUDA GPU of compute
    capability 8.0 or newer (measured on Hopper; Triton's support of older chips is partial),
    Triton present, neither the exact path nor torch.compile (which generates its own fused
    kernels). ``ADM_FUSED=0`` (or false, no, off) turns them off (to compare, or to work around a
    Triton problem)."""
    if not env_switch("ADM_FUSED"):
        return False
    device = torch.device(device)
    if device.type != "cuda" or compile or exact or not fused.available():
        return False
    return not torch.cuda.is_available() or torch.cuda.get_device_capability(device) >= (8, 0)


def prepare(model: nn.Module, *, device: torch.device | str | None = None, dtype: Any = "auto",
            channels_last: bool | None = None, compile: bool | str = False, exact: bool = False,
            prepack: bool | None = None, fused_kernels: bool | None = None,
            winograd_convs: bool | None = None) -> nn.Module:
    """Make ``model`` (a UNet or Classifier) fast for inference, in place; returns it.

    ``device``: where to run (default: where the model is). ``dtype``: "auto", "float32",
    "bfloat16" or "float16" (see ``resolve_dtype``). ``channels_last``: default on for CPU, for
    compiled models and with the fused kernels, off for plain eager CUDA (see the comment below;
    measured both ways on an H200). ``compile``: False, True, or
    a torch.compile mode such as "max-autotune" / "reduce-overhead" (the latter replays CUDA
    graphs; CPU falls back to the default mode). ``exact``: the reference's attention arithmetic
    (for comparisons; slower). ``prepack``: CPU float32 only, default on for a U-Net without
    ``compile`` or fused kernels: see ``PrepackedConv2d`` (costs a second copy of the conv weights
    in RAM).
    ``fused_kernels``: the Triton GroupNorm(+scale-shift)(+SiLU) kernels of ``fused.py`` on
    channels_last activations (default: ``use_fused_kernels``).
    ``winograd_convs``: with ``prepack``, the wide 3x3 convolutions by Winograd F(4x4, 3x3)
    (``winograd.py``; default on, or ``ADM_WINOGRAD=0`` / false / no / off): ~2x faster at the
    64x64 model's lower levels, ~3x the float32 rounding error of a direct conv, and transformed
    weights 4x the size of those convs' weights in RAM (instead of the packed copy).
    """
    # read on every device, so that a bad value is refused wherever it is set, not only on CPU
    winograd_on = env_switch("ADM_WINOGRAD")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():  # (torch's own error is an AssertionError)
        raise UsageError(f"device {device} was asked for but no CUDA device is available")
    dt = resolve_dtype(dtype, device, classifier=isinstance(model, Classifier))
    use_fused = use_fused_kernels(device, compile=compile, exact=exact) if fused_kernels is None \
        else bool(fused_kernels) and not exact
    if use_fused and not fused.available():
        raise UsageError("fused kernels need Triton (it comes with PyTorch's CUDA builds)")
    _outside_inference_mode(model)
    model.eval().requires_grad_(False)
    _unprepare(model)  # a second prepare starts from plain modules, not from the first one's choices
    # Cast before the move: half the bytes cross to the device. Always cast, so that a model
    # prepared before in another dtype gets this one.
    model.to(dtype=dt)
    if dt != torch.float32:
        for m in _keep_float32(model, device, use_fused):
            m.float()
    model.to(device=device)
    for m in model.modules():
        if isinstance(m, GroupNorm32):
            m.fused = use_fused
    if channels_last is None:
        # CPU: oneDNN's convolutions are fastest in NHWC. CUDA with the fused kernels: NHWC too
        # (cuDNN's fastest half-precision convolutions; the kernels read NHWC). Plain eager
        # CUDA: no, because CUDA's own GroupNorm kernel reads NCHW only, so every norm would
        # copy NHWC -> NCHW and the next conv copy back (measured on an H200, 512x512 guided
        # step: 41% of GPU time in those copies). Under torch.compile the norms are generated
        # kernels and NHWC costs nothing.
        # ``exact``: the reference's NCHW layout and plain convolutions, for bit-level comparisons.
        channels_last = (device.type != "cuda" and not exact) or bool(compile) or use_fused
    if use_fused and not channels_last:
        raise UsageError("the fused kernels work on channels_last activations")
    # 4-D weights only; models.py follows the input conv's layout.
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    set_exact_attention(model, exact)
    if prepack is None:  # the classifier runs under autograd, where the packed path steps aside
        # (and the fused residual blocks call their convs' weights directly: no use for it)
        prepack = isinstance(model, UNet) and not compile and channels_last and not use_fused
    if prepack and device.type == "cpu" and dt == torch.float32 and _prepack_works():
        if winograd_convs is None:
            winograd_convs = winograd_on and _winograd_fits(model)
        for m in model.modules():
            if type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
                m.__class__ = PrepackedConv2d
                m._packed = m._packed_key = None
                m.use_winograd = bool(winograd_convs) and winograd.applies(m)
    if device.type == "cuda":
        # Fixed shapes for a whole run: let cuDNN time its convolution algorithms once per shape
        # and keep the fastest (a process-wide switch; it costs a few ms on each new shape).
        torch.backends.cudnn.benchmark = True
    if compile:
        _compile(model, device, compile)
    return model


# Winograd's transformed weights (4x the bytes of the convs they replace: 3.3 GB for the 64x64
# U-Net) may take at most this fraction of the machine's RAM, else the direct convs are kept.
WINOGRAD_RAM_FRACTION = 0.25


def _winograd_fits(model: nn.Module) -> bool:
    """Whether the transformed weights of every conv that may use them fit the RAM budget."""
    need = sum(36 * m.in_channels * m.out_channels * 4 for m in model.modules()
               if isinstance(m, nn.Conv2d) and winograd.applies(m)
               and min(m.in_channels, m.out_channels) >= winograd.MIN_CHANNELS)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX: no way to ask cheaply
        return True
    return need <= WINOGRAD_RAM_FRACTION * ram


def _outside_inference_mode(model: nn.Module) -> None:
    """Parameters and buffers made under ``torch.inference_mode`` (a model loaded inside it) as
    ordinary tensors: an inference tensor has no version counter, and converting one in place
    (``.to``) outside that mode leaves a parameter that most ops then refuse."""
    with torch.inference_mode(False):
        for m in model.modules():
            for name, p in m._parameters.items():
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for name, b in m._buffers.items():
                if b is not None and b.is_inference():
                    m._buffers[name] = b.detach().clone()


def _unprepare(model: nn.Module) -> None:
    """Undo what an earlier ``prepare`` left that this one may not want: prepacked convolutions
    (and their packed weight copies), the fused path's derived weights (``layers.derived``) and
    CUDA graphs captured over the old weights."""
    from .graphs import forget_graphs

    layers.forget_derived(model)

    for m in model.modules():
        if isinstance(m, PrepackedConv2d):
            m.__class__ = nn.Conv2d
            for name in ("_packed", "_packed_key", "_bias4", "use_winograd"):
                m.__dict__.pop(name, None)
    forget_graphs(model)


class PrepackedConv2d(nn.Conv2d):
    """A CPU Conv2d that reorders its weight into oneDNN's blocked layout once, not every call.

    Eager PyTorch hands oneDNN the plain OIHW weight and oneDNN reorders it on every call: for the
    64x64 U-Net that is 0.87 GiB of weights rewritten per forward (1.7 GiB for 512x512), and the
    packed copy costs that much RAM once. This keeps the reordered copy
    (keyed by input shape and weight version, so a new batch size or a reloaded state_dict
    repacks) and calls the same oneDNN convolution that torch.compile's CPU backend uses. Same
    parameters and state_dict; bit-identical outputs (measured: the 64x64 U-Net forward at batch 4
    equal to the last bit), ~10% faster forwards on 2 cores. Used only when no autograd graph is
    being recorded (the op has no backward) -- otherwise it is an ordinary Conv2d.

    With ``use_winograd`` set (by ``prepare``), a wide 3x3 conv runs by ``winograd.conv3x3`` instead
    wherever ``winograd.worth_it`` says so for the input's shape, its transformed weights kept
    by ``layers.derived`` (no packed copy is made for shapes that never run directly).
    """

    _packed: torch.Tensor | None
    _packed_key: tuple | None
    _bias4: torch.Tensor | None = None
    use_winograd: bool = False  # may use winograd.conv3x3 (set by prepare)

    def __getstate__(self):  # copies and pickles drop the cache (oneDNN tensors do not copy)
        state = super().__getstate__()
        return {**state, "_packed": None, "_packed_key": None, "_bias4": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
            return super().forward(x)
        if self.use_winograd and winograd.worth_it(tuple(x.shape), self.out_channels):
            u = layers.derived(self, "winograd_u", (w,), lambda: winograd.transform_weight(w))
            return winograd.conv3x3(x, u, self.bias)
        key = (tuple(x.shape), *version_key(w))
        if self._packed_key != key:
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            self._packed_key = key
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """self(nearest 2x upsample of x) without the upsample (``layers.upsample_conv``).

        Output pixel (2i + a, 2j + b) of a 3x3 conv over the upsampled image sees only 2x2
        distinct input pixels; summing the kernel taps that land on the same pixel gives four
        2x2 kernels (one per parity a, b), computed as one conv with 4x the output channels at
        the low resolution: 16/36 of the multiply-adds. Equal to the upsample-then-conv result
        up to float rounding (the taps are summed first), ~3e-6 relative.
        """
        w = self.weight
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
                or self.kernel_size != (3, 3) or self.stride != (1, 1) or self.padding != (1, 1)
                or self.dilation != (1, 1) or self.groups != 1):
            return self(F.interpolate(x, scale_factor=2, mode="nearest"))
        key = ("up", tuple(x.shape), *version_key(w), *version_key(self.bias))  # the bias is folded too
        if self._packed_key != key:
            folded = _fold_for_upsample(w.detach())
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                folded.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
            self._bias4 = None if self.bias is None else self.bias.detach().repeat(4)
            self._packed_key = key
        y = torch.ops.mkldnn._convolution_pointwise(x, self._packed, self._bias4, [1, 1], [1, 1], [1, 1], 1,
                                                    "none", [], "")  # [N, 4O, h + 1, w + 1]
        return interleave_phases(y, w.shape[0])


def interleave_phases(y: torch.Tensor, channels: int) -> torch.Tensor:
    """The [N, 4O, h + 1, w + 1] output of a 2x2 conv (padding 1) with ``_fold_for_upsample``'s
    kernels as the [N, O, 2h, 2w] image: phase (a, b) fills pixels (2i + a, 2j + b) from its
    window starting at (a, b). channels_last out."""
    n, _, h1, w1 = y.shape
    h, wd, o = h1 - 1, w1 - 1, channels
    out = torch.empty(n, o, 2 * h, 2 * wd, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, b::2] = y[:, k * o:(k + 1) * o, a:a + h, b:b + wd]
    return out


def _fold_for_upsample(w: torch.Tensor) -> torch.Tensor:
    """[O, I, 3, 3] -> [4O, I, 2, 2]: per output parity (a, b), the taps that read the same
    low-resolution pixel, summed. Parity 0 reads rows (i-1, i) with taps (0, 1+2); parity 1
    reads rows (i, i+1) with taps (0+1, 2); a 2x2 conv with padding 1 gives both."""
    groups = (((0,), (1, 2)), ((0, 1), (2,)))
    kernels = []
    for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
        rows = [w[:, :, list(r)].sum(2) for r in groups[a]]  # each [O, I, 3]
        kernels.append(torch.stack([torch.stack([r[:, :, list(c)].sum(2) for c in groups[b]], -1)
                                    for r in rows], -2))  # [O, I, 2, 2]
    return torch.cat(kernels).contiguous(memory_format=torch.channels_last)


_PREPACK_OK: bool | None = None


def _prepack_works() -> bool:
    """Whether this torch build has the oneDNN ops ``PrepackedConv2d`` needs and they agree with
    F.conv2d (checked once on a tiny conv); otherwise plain convolutions are kept."""
    global _PREPACK_OK
    if _PREPACK_OK is None:
        try:
            _PREPACK_OK = _check_prepack()
        except Exception:  # noqa: BLE001 - any failure means: do not use the private ops
            _PREPACK_OK = False
    return _PREPACK_OK


def _check_prepack() -> bool:
    with torch.inference_mode(False):  # a caller's inference mode must not decide this for good
        conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
        x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
        want = conv(x)
        conv.__class__ = PrepackedConv2d
        conv._packed = conv._packed_key = None
        with torch.no_grad():
            got = conv(x)
        return torch.backends.mkldnn.is_available() and torch.allclose(got, want, atol=1e-5)


def _compile(model: nn.Module, device: torch.device, how: bool | str) -> None:
    """torch.compile in place (``nn.Module.compile``): the module keeps its type and state_dict
    keys (a ``torch.compile(model)`` wrapper would prefix them with ``_orig_mod.``)."""
    mode = how if isinstance(how, str) else None
    if device.type != "cuda" and mode in ("reduce-overhead", "max-autotune"):
        mode = None  # CUDA graphs and GPU autotuning do not exist on CPU/MPS
    # One shape per run (fixed batch and image size): static shapes give the best kernels;
    # a last, smaller batch compiles once more.
    model.compile(mode=mode, dynamic=False)


def prepare_models(unet: nn.Module, classifier: nn.Module | None = None, **kwargs: Any):
    """``prepare`` both networks of a guided run with the same settings; returns (unet, classifier)."""
    unet = prepare(unet, **kwargs)
    if classifier is not None:
        classifier = prepare(classifier, **kwargs)
    return unet, classifier


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


# -- batch size --------------------------------------------------------------------------------

def _probe_inputs(model: nn.Module, n: int, device: torch.device) -> tuple:
    cfg = model.config
    size = cfg.image_size
    x = torch.randn(n, cfg.in_channels, size, size, device=device)
    t = torch.full((n,), cfg.diffusion_steps // 2, device=device, dtype=torch.long)
    kw: dict = {}
    if isinstance(model, UNet):
        if cfg.class_cond:
            kw["y"] = torch.zeros(n, dtype=torch.long, device=device)
        if cfg.is_super_res:
            kw["low_res"] = torch.randn(n, cfg.in_channels, cfg.small_size, cfg.small_size, device=device)
    return x, t, kw


def _peak_bytes(unet: nn.Module, classifier: nn.Module | None, n: int, device: torch.device,
                held_together: bool = False) -> int:
    """Peak CUDA memory of one (guided) step at batch n, run eagerly (``.forward``: a compiled
    module is not recompiled for the probe; eager peaks are the higher, so the estimate errs safe).
    ``held_together``: add the U-Net's and the classifier's peaks, for CUDA graphs: their captures
    share one pool (graphs.py), which then holds about the larger of the two plus what the
    allocator cannot reuse between them, so the sum errs safe; eagerly the two take turns."""
    from .guidance import classifier_grad

    x, t, kw = _probe_inputs(unet, n, device)
    runs = [lambda: unet.forward(x, t, **kw)]
    if classifier is not None:
        y = torch.zeros(n, dtype=torch.long, device=device)
        runs.append(lambda: classifier_grad(classifier.forward, x, t, y, 1.0))
    peaks = []
    for run in runs:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():  # (classifier_grad enables grad for its own backward)
            run()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    return sum(peaks) if held_together else max(peaks)


def auto_batch_size(unet: nn.Module, classifier: nn.Module | None, settings: Any, device: torch.device | str,
                    num_samples: int, cuda_graph: bool = False) -> int:
    """The largest batch (<= num_samples) whose step fits in the free device memory.

    CUDA: two eager probe steps (batch 1 and 2, after an unmeasured one) give the memory per
    image; the batch is what fits in 85% of the free memory (plus what PyTorch already holds in its cache), rounded down
    to a multiple of 8 when above 8 (tensor-core friendly). ``settings.guidance`` > 0 counts the
    classifier's forward and backward; ``cuda_graph`` counts the two networks' memory as held at
    once (see ``_peak_bytes``). CPU / MPS: ``CPU_BATCH`` (``ADM_CPU_BATCH`` overrides).
    """
    num_samples = max(1, int(num_samples))
    device = torch.device(device)
    guided = classifier is not None and getattr(settings, "guidance", 0) > 0
    if device.type != "cuda":
        return min(num_samples, cpu_batch_size())
    clf = classifier if guided else None
    # A first, unmeasured probe: one-time allocations (cuBLAS workspaces, cuDNN's algorithm
    # search) would otherwise land in the batch-1 peak only and shrink the per-image difference.
    _peak_bytes(unet, clf, 1, device, cuda_graph)
    one = _peak_bytes(unet, clf, 1, device, cuda_graph)
    two = _peak_bytes(unet, clf, 2, device, cuda_graph)
    per_image = max(two - one, 1)
    fixed = max(one - per_image, 0)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    n = int((0.85 * free - fixed) // per_image)
    if n > 8:
        n = n // 8 * 8
    return max(1, min(num_samples, n))


def describe(model: nn.Module) -> str:
    """One line for logs: dtype, layout, attention, compiled."""
    p = next(model.parameters())
    conv = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), p)
    layout = "channels_last" if conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous() \
        else "NCHW"
    exact = any(getattr(m, "exact", False) for m in model.modules())
    packed = any(isinstance(m, PrepackedConv2d) for m in model.modules())
    wino = any(getattr(m, "use_winograd", False) for m in model.modules())
    return (f"{type(model).__name__}: {str(conv.dtype).replace('torch.', '')}, {layout}, "
            f"{'exact' if exact else 'sdpa'} attention{', prepacked convs' if packed else ''}"
            f"{' (Winograd where wide)' if wino else ''}"
            f"{', fused GroupNorm' if any(getattr(m, 'fused', False) for m in model.modules()) else ''}"
            f"{', compiled' if is_compiled(model) else ''}")

