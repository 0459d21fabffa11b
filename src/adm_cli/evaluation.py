"""Measured sample quality for the bundled demo models (the harness sampler work is judged with).

The data: scikit-learn's handwritten digits (1,797 8x8 greyscale images, 10 classes, shipped
inside the scikit-learn wheel, so nothing is downloaded), upsampled to 32x32, grey replicated to
RGB, scaled to [-1, 1]. A fixed stratified split holds out 20% that no model trains on.

The instrument: ``EvalNet``, a small plain CNN trained on *clean* held-in images only and never
used for guidance. Two numbers per setting, both on its outputs for uint8 images:

- class accuracy: the fraction of samples whose argmax class is the requested label y;
- the Frechet distance between Gaussians fitted to penultimate features f of generated and of
  held-out real images (Heusel et al. 2017, the FID formula on our own features):
  FD = |mu_g - mu_r|^2 + tr(Sigma_g + Sigma_r - 2 (Sigma_r^1/2 Sigma_g Sigma_r^1/2)^1/2).

scikit-learn is imported only where the dataset is loaded (it is a test/training extra).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .api import SamplerSettings, from_uint8, generate, to_uint8
from .errors import WeightsError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_FILES = {
    "demo-digits": "demo-digits.safetensors",
    "demo-digits-uncond": "demo-digits-uncond.safetensors",
    "demo-digits-classifier": "demo-digits-classifier.safetensors",
    "demo-digits-eval": "demo-digits-eval.safetensors",
}
IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def demo_path(name: str) -> Path:
    """The bundled file of a demo model (``demo-digits``, ``-uncond``, ``-classifier``, ``-eval``)."""
    if name not in DEMO_FILES:
        raise WeightsError(f"unknown demo model {name!r} (known: {', '.join(DEMO_FILES)})")
    return DEMO_DIR / DEMO_FILES[name]


# -- data ----------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: round(test_fraction * n_c) of each class c go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def upsample_digits(raw: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[N, 8, 8] ink values 0..16 -> [N, 3, size, size] float32 in [-1, 1].

    Bicubic keeps strokes smooth (nearest would give blocky 4x4 pixels the model must copy);
    its overshoot is clipped back into [0, 1] before scaling.
    """
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 2 - 1).repeat(1, 3, 1, 1).contiguous()


def load_digits(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """The digits of one split ('train', 'test' or 'all'): ([N, 3, size, size] in [-1, 1], labels)."""
    from sklearn.datasets import load_digits as sk_load_digits  # lazily: not a runtime dependency

    data = sk_load_digits()
    raw, labels = data.images, data.target.astype(np.int64)
    if split != "all":
        train, test = stratified_split(labels)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        keep = train if split == "train" else test
        raw, labels = raw[keep], labels[keep]
    return upsample_digits(raw, size), labels


# -- the evaluation classifier ----------------------------------------------------------------
class EvalNet(nn.Module):
    """A plain CNN on clean 32x32 images: three conv stages, a 128-d feature layer, logits.

    Deliberately unlike the guidance classifier (no timestep, no attention, never sees noise),
    so that guidance cannot "fool" the instrument that judges it.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32, features: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(4 * w * 16, features), nn.ReLU(),
        )
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(features, num_classes)
        self.arch = {"num_classes": num_classes, "width": width, "features": features}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations f(x) the Frechet distance is measured on."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


def save_eval_classifier(path: str | Path, net: EvalNet, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    meta = {"adm_eval_arch": json.dumps(net.arch, sort_keys=True), **{k: str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def load_eval_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> EvalNet:
    """The bundled (or a given) evaluation classifier, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else demo_path("demo-digits-eval")
    if not path.exists():
        raise WeightsError(f"evaluation classifier not found: {path} (run scripts/train_demo.py)")
    with safe_open(str(path), framework="pt") as f:
        arch = json.loads((f.metadata() or {}).get("adm_eval_arch", "{}"))
    net = EvalNet(**arch)
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.to(device).eval().requires_grad_(False)


@torch.no_grad()
def eval_outputs(net: EvalNet, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F] float64, predicted class [N]) of uint8 NHWC images or [-1, 1] NCHW floats."""
    device = next(net.parameters()).device
    feats, preds = [], []
    for b in range(0, len(images), batch_size):
        chunk = images[b:b + batch_size]
        x = from_uint8(chunk, device) if isinstance(chunk, np.ndarray) else chunk.to(device).float()
        f = net.features(x)
        feats.append(f.double().cpu().numpy())
        preds.append(net.head(f).argmax(1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(preds)


def class_accuracy(net: EvalNet, images: np.ndarray | torch.Tensor, labels: Sequence[int]) -> float:
    """Fraction of images the evaluation classifier assigns to their requested class."""
    _, pred = eval_outputs(net, images)
    return float(np.mean(pred == np.asarray(labels)))


# -- Frechet distance ------------------------------------------------------------------------
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of features [N, F], in float64 (Sigma with the unbiased 1 / (N - 1))."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_b^1/2 S_a S_b^1/2)^1/2).

    tr (S_a S_b)^1/2 equals tr (S_b^1/2 S_a S_b^1/2)^1/2, whose argument is symmetric PSD, so a
    symmetric eigendecomposition suffices (no scipy, no complex round-off to discard).
    """
    (mu_a, s_a), (mu_b, s_b) = stats_a, stats_b
    root_b = _sqrtm_psd(s_b)
    middle = root_b @ s_a @ root_b
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)


def real_stats(net: EvalNet, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of real images of a split, quantised to uint8 like generated ones."""
    x, _ = load_digits(split)
    feats, _ = eval_outputs(net, to_uint8(x))
    return gaussian_stats(feats)


# -- one setting of the harness --------------------------------------------------------------
@dataclass(frozen=True)
class EvalResult:
    name: str
    num_samples: int
    accuracy: float
    frechet: float
    seconds: float
    class_counts: tuple[int, ...]


def balanced_labels(per_class: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """0, 1, ..., 9, 0, 1, ...: every prefix of whole rounds is balanced."""
    return np.tile(np.arange(num_classes), per_class)


def evaluate_setting(name: str, unet: torch.nn.Module, settings: SamplerSettings, net: EvalNet,
                     reference: tuple[np.ndarray, np.ndarray], *, per_class: int = 50, seed: int = 0,
                     classifier: torch.nn.Module | None = None, batch_size: int = 250) -> EvalResult:
    """Sample ``per_class`` images of each class, then measure accuracy and FD to ``reference``.

    For an unconditional model without guidance the labels are only requests it cannot see,
    so its accuracy should sit near chance (1 / 10): the floor guidance has to lift.
    """
    labels = balanced_labels(per_class)
    start = time.perf_counter()
    out = generate(unet, num_samples=len(labels), seed=seed, classes=labels, classifier=classifier,
                   settings=settings, batch_size=batch_size)
    seconds = time.perf_counter() - start
    feats, pred = eval_outputs(net, out.images)
    counts = tuple(int(c) for c in np.bincount(pred, minlength=NUM_CLASSES))
    return EvalResult(name, len(labels), float(np.mean(pred == labels)),
                      frechet_distance(gaussian_stats(feats), reference), seconds, counts)
