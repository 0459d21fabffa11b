"""The Python API: load models, sample images, get uint8 arrays back.

    from adm_cli import api
    unet = api.load_model("64x64_diffusion.safetensors", device="cuda")
    clf = api.load_model("64x64_classifier.safetensors", device="cuda")
    out = api.generate(unet, classifier=clf, classes=[207] * 4, seed=0,
                       settings=api.SamplerSettings("ddpm", respacing="250", guidance=1.0))
    out.images  # uint8 [4, 64, 64, 3]; out.labels: [207, 207, 207, 207]

Image k of a run depends only on (seed, k, models, settings): see noise.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from . import fast
from .config import ClassifierConfig, UNetConfig, guidance_mismatch
from .denoiser import Denoiser
from .errors import SamplingError, UsageError
from .fast import prepare  # noqa: F401 - part of the public API
from .graphs import graphed_unet
from .guidance import classifier_guidance
from .models import Classifier, UNet
from .noise import SampleNoise, seeds_for
from .samplers import SAMPLERS
from .schedule import Schedule
from .settings import SamplerSettings
from .weights import load_model  # noqa: F401 - part of the public API

ProgressFn = Callable[[int], None]


@dataclass
class Samples:
    """Generated images (uint8 NHWC), their labels (-1: none) and sample indices."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC, truncating as OpenAI's scripts do (their npz layout).

    A one-channel (grey) model's images are replicated to RGB, so every model writes the same
    [N, H, W, 3] layout and exactly grey pixels."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC -> [-1, 1] NCHW float32 (how the reference feeds base samples to an upsampler)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def random_labels(seed: int, count: int, num_classes: int) -> np.ndarray:
    """Labels for ``--class`` left empty: label k depends only on (seed, k)."""
    return np.random.default_rng(seed).integers(0, num_classes, size=count)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_batch(unet: UNet, indices: Sequence[int], *, seed: int, settings: SamplerSettings,
                 labels: Sequence[int] | None = None, classifier: Classifier | None = None,
                 low_res: torch.Tensor | None = None, progress: ProgressFn | None = None,
                 cuda_graph: bool = False, stream: int = 0) -> torch.Tensor:
    """Sample the images with these indices as one batch; returns x_0 in [-1, 1], float32 NCHW.

    ``cuda_graph`` (CUDA only, else ignored): replay the network calls of each step as CUDA
    graphs (graphs.py; captured on the first batch of each shape): worth it where the GPU waits
    on the host (guided 64x64 at batch 64 on an H100: 86 -> 56 ms per step). The captures stay
    on the modules, holding their memory pool, until the modules are freed or ``prepare``d
    again; ``adm sample`` turns this on for CUDA.
    ``stream``: which random stream of the run (``noise.seeds_for``; 1 for an upsampler stage)."""
    cfg: UNetConfig = unet.config
    device = model_device(unet)
    schedule = Schedule.create(cfg.noise_schedule, cfg.diffusion_steps, settings.respacing_for(cfg.diffusion_steps))
    noise = SampleNoise(seeds_for(seed, indices, stream), device)
    x = noise.initial((cfg.in_channels, cfg.image_size, cfg.image_size))
    y = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    graph = cuda_graph and device.type == "cuda"
    if graph and any(fast.is_compiled(m) for m in (unet, classifier) if m is not None):
        raise UsageError("cuda_graph and a compiled model do not combine: choose one")
    fn = Denoiser(graphed_unet(unet) if graph else unet, schedule, y=y if cfg.class_cond else None, low_res=low_res)
    if settings.guidance > 0:
        if classifier is None or y is None:
            raise UsageError("classifier guidance needs a classifier and class labels")
        fn = classifier_guidance(fn, classifier, schedule, y, settings.guidance, cuda_graph=graph)
    step = (lambda i, _x: progress(len(indices))) if progress else None
    # On cuda:N the current device must be N too: the fused Triton kernels launch on it.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, torch.inference_mode(settings.guidance == 0), torch.no_grad():
        return SAMPLERS[settings.sampler](fn, x, schedule, noise=noise, clip_x0=settings.clip_x0,
                                          variance=cfg.variance, eta=settings.eta, callback=step)


def generate(unet: UNet, *, num_samples: int | None = None, indices: Sequence[int] | None = None,
             seed: int = 0, classes: Sequence[int] | None = None, classifier: Classifier | None = None,
             settings: SamplerSettings = SamplerSettings(), batch_size: int = 8,
             low_res: np.ndarray | None = None, progress: ProgressFn | None = None,
             on_batch: Callable[[Samples], None] | None = None, cuda_graph: bool = False,
             stream: int = 0) -> Samples:
    """Sample ``num_samples`` images (or exactly the sample ``indices``), in batches;
    ``num_samples`` left out with ``classes`` given: one image per label.

    ``classes``: one label per sample index 0..N-1 (``labels[k]`` for index k); None with a
    class-conditional model or guidance draws them from ``random_labels(seed, ...)``.
    ``low_res``: uint8 NHWC base images, one per index, for a super-resolution model.
    ``on_batch`` receives each finished batch (to write outputs as they complete).
    ``cuda_graph``, ``stream``: see ``sample_batch``.
    """
    if indices is None:
        if num_samples is None and classes is not None:
            num_samples = len(classes)  # one sample per label given
        if num_samples is None or num_samples < 1:
            raise UsageError(f"num_samples (-n) must be at least 1, got {num_samples}")
        indices = list(range(num_samples))
    indices = [int(k) for k in indices]
    if not indices or min(indices) < 0:
        raise UsageError("indices must be a non-empty list of sample indices >= 0")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    total = max(indices) + 1
    if not 0 <= seed <= 2 ** 63 - total:  # sample k's generator seed S + k must be a signed 64-bit seed
        raise UsageError(f"seed must be in 0..2**63 - {total} for these samples, got {seed}")
    cfg: UNetConfig = unet.config
    if not isinstance(cfg, UNetConfig):
        raise UsageError(f"generate needs a diffusion U-Net, got a {type(unet).__name__}")
    if classifier is not None and not isinstance(classifier.config, ClassifierConfig):
        raise UsageError(f"classifier must be a noisy-image classifier, got a {type(classifier).__name__}")
    if settings.guidance > 0 and classifier is None:
        raise UsageError("classifier guidance (guidance > 0) needs a classifier")
    if classifier is not None and (found := guidance_mismatch(cfg, classifier.config)) is not None:
        what, theirs, ours = found
        raise UsageError(f"the classifier does not fit the U-Net: its {what} is {theirs}, the U-Net's {ours}")
    if cfg.is_super_res and low_res is None:
        raise UsageError("this U-Net is an upsampler: pass low_res, the base images (uint8 NHWC, one per index)")
    if not cfg.is_super_res and low_res is not None:
        raise UsageError("low_res is for an upsampler; this U-Net takes no base images")
    needs_labels = cfg.class_cond or settings.guidance > 0
    num_classes = cfg.num_classes if cfg.class_cond else classifier.config.num_classes if needs_labels else None
    if classes is None and needs_labels:
        classes = random_labels(seed, total, num_classes)
    if isinstance(classes, torch.Tensor):
        classes = classes.tolist()
    if classes is not None and (bad := next((c for c in classes if not isinstance(c, (int, np.integer))
                                             or isinstance(c, bool)), None)) is not None:
        raise UsageError(f"classes must be integer labels, got {bad!r} (names: adm_cli.imagenet.resolve_classes)")
    label_arr = None if classes is None else np.asarray(classes, dtype=np.int64)
    if label_arr is not None and len(label_arr) < total:
        raise UsageError(f"got {len(label_arr)} class labels for {total} samples")
    if low_res is not None and len(low_res) < total:
        raise UsageError(f"got {len(low_res)} low_res images for {total} samples")
    if label_arr is not None and num_classes is not None and len(label_arr) and \
            not (0 <= label_arr.min() and label_arr.max() < num_classes):
        bad = next(int(c) for c in label_arr if not 0 <= c < num_classes)
        raise UsageError(f"class label {bad} is out of range: this model has classes 0..{num_classes - 1}")
    device = model_device(unet)
    start = time.perf_counter()
    images, labels = [], []
    for b in range(0, len(indices), batch_size):
        chunk = indices[b:b + batch_size]
        lab = None if label_arr is None else label_arr[chunk]
        lr = None if low_res is None else from_uint8(low_res[chunk], device)
        x = sample_batch(unet, chunk, seed=seed, settings=settings, labels=lab, classifier=classifier,
                         low_res=lr, progress=progress, cuda_graph=cuda_graph, stream=stream)
        if not bool(torch.isfinite(x).all()):  # to_uint8 would write NaN as black, silently
            raise SamplingError(f"sampling gave NaN or infinite values (samples {chunk[0]}..{chunk[-1]}; guidance "
                                f"{settings.guidance:g}, dtype {str(x.dtype).replace('torch.', '')}): a guidance scale "
                                "too large, or broken weights; nothing was written for these samples")
        batch = Samples(to_uint8(x), np.full(len(chunk), -1) if lab is None else lab, np.asarray(chunk))
        if on_batch is not None:
            on_batch(batch)
        images.append(batch.images)
        labels.append(batch.labels)
    return Samples(np.concatenate(images), np.concatenate(labels), np.asarray(indices),
                   seconds=time.perf_counter() - start, extra={"device": str(device)})
