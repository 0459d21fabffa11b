"""Random-weight checkpoints written exactly as each publisher writes them (test helpers).

OpenAI: ``torch.save(model.state_dict())`` (zip, or the legacy format). mmagic: a dict with
``meta``, ``state_dict`` (keys prefixed ``unet.`` / ``classifier.``, the U-Net under mmagic's
module names) and ``message_hub`` holding numpy arrays, scalars, dtypes and an instance of a
non-torch class from a fake ``mmengine`` module that exists only while the file is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from adm_cli.config import PRESETS, get_preset
from adm_cli.convert import _expected_shapes, openai_to_mmagic
from conftest import randomize
from reference import reference_classifier, reference_unet

# Every architecture family at a size that builds in milliseconds: (preset it shrinks, changes).
# Attention at 16x16 and 8x8 only: full-resolution attention would dominate the test time.
SMALL = {
    "64x64": ("64x64_diffusion", dict(attention_resolutions="16,8", num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,2,2", num_head_channels=32)),
    "128x128": ("128x128_diffusion", dict(attention_resolutions="16,8", num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,1,2")),
    "256x256": ("256x256_diffusion", dict(attention_resolutions="16,8", num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,1,2", num_head_channels=32)),
    "256x256_uncond": ("256x256_diffusion_uncond", dict(attention_resolutions="16,8", num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,1,2", num_head_channels=32)),
    "512x512": ("512x512_diffusion", dict(attention_resolutions="16,8", num_channels=64, num_res_blocks=1, image_size=32, channel_mult="0.5,1,2", num_head_channels=32)),
    "512x512_uncond_finetune": ("512x512_diffusion_uncond_finetune_008100", dict(attention_resolutions="16,8", num_channels=64, num_res_blocks=1, image_size=32, channel_mult="0.5,1,2", num_head_channels=32)),
    "64_256_upsampler": ("64_256_upsampler", dict(attention_resolutions="16,8", num_channels=32, num_res_blocks=1, image_size=32, small_size=8, channel_mult="1,1,2")),
    "128_512_upsampler": ("128_512_upsampler", dict(attention_resolutions="16,8", num_channels=32, num_res_blocks=1, image_size=32, small_size=16, channel_mult="1,1,2", num_head_channels=32)),
    "lsun": ("lsun_256", dict(attention_resolutions="16,8", num_channels=32, num_res_blocks=1, image_size=32, channel_mult="1,1,2", num_head_channels=32)),
    "portrait": ("portrait_512_w128", dict(attention_resolutions="16,8", num_channels=64, num_res_blocks=1, image_size=32, channel_mult="0.5,1,2", num_head_channels=32)),
    "64x64_classifier": ("64x64_classifier", dict(image_size=32, classifier_width=32, classifier_depth=1, channel_mult="1,2", num_head_channels=32, num_classes=10)),
    "256x256_classifier": ("256x256_classifier", dict(image_size=32, classifier_width=32, classifier_depth=1, channel_mult="1,1,2", num_head_channels=32, num_classes=10)),
}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a shared CPU, a second torch thread only adds contention
    (measured: a forward pass 8x slower with 2 threads than 1 while other jobs run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(family: str):
    preset, changes = SMALL[family]
    return get_preset(preset).replace(**changes)


def inline_roles(**roles) -> str:
    """A registry ``roles = {...}`` line for small configs: { role = { preset = ..., changes } }."""
    parts = []
    for role, family in roles.items():
        preset, changes = SMALL[family]
        flags = ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"preset": preset, **changes}.items())
        parts.append(f"{role} = {{ {flags} }}")
    return "roles = { " + ", ".join(parts) + " }"


def reference_model(cfg, seed: int = 0):
    """OpenAI's network for ``cfg`` with random, non-trivial weights."""
    ref = reference_classifier(cfg) if hasattr(cfg, "classifier_width") else reference_unet(cfg)
    return randomize(ref, seed=seed).eval()


def preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of a full-size preset (built on the meta device, once per preset)."""
    return _expected_shapes(PRESETS[name])


def write_openai(path: Path, state: dict, legacy: bool = False) -> Path:
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@contextlib.contextmanager
def fake_mmengine():
    """A stand-in ``mmengine.logging.history_buffer`` module, only for the time of a torch.save."""
    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
    assert not any(n in sys.modules for n in names), "the real mmengine must not be loaded in tests"
    mods = {n: types.ModuleType(n) for n in names}

    class HistoryBuffer:  # what mmengine's MessageHub pickles per logged scalar
        def __init__(self, values):
            self._log_history = np.asarray(values, dtype=np.float64)
            self._count_history = np.ones(len(values))
            self.max_length = 1000000

        def mean(self):
            return float(self._log_history.mean())

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = names[-1], "HistoryBuffer"
    mods[names[-1]].HistoryBuffer = HistoryBuffer
    sys.modules.update(mods)
    try:
        yield HistoryBuffer
    finally:
        for n in names:
            sys.modules.pop(n, None)


def mmagic_state(unet: dict | None = None, classifier: dict | None = None, module: bool = False) -> dict:
    state = {}
    for k, v in (unet or {}).items():
        state["unet." + openai_to_mmagic(k)] = v
    for k, v in (classifier or {}).items():
        state["classifier." + k] = v
    return {("module." + k if module else k): v for k, v in state.items()}


def write_mmagic(path: Path, unet: dict | None = None, classifier: dict | None = None, *, wrapped: bool = True,
                 legacy: bool = True, module: bool = False, hub_extra: dict | None = None) -> Path:
    """An mmagic checkpoint: wrapped (meta, state_dict, message_hub) or a bare prefixed state dict."""
    state = mmagic_state(unet, classifier, module)
    if not wrapped:
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        return path
    with fake_mmengine() as HistoryBuffer:
        loss = HistoryBuffer([0.5, 0.25, 0.125])
        obj = {
            "meta": {"mmengine_version": "0.7.4", "time": "20230401_120000", "epoch": 3, "iter": 1000,
                     "seed": np.int64(2022), "experiment_name": "adm-g_8xb32_imagenet"},
            "state_dict": state,
            "message_hub": {
                "log_scalars": {"train/loss": loss},
                "runtime_info": {"iter": np.int64(1000), "lr": np.float32(1e-4), "dtype": np.dtype("float32"),
                                 "scalar_type": np.float64, "dtype_class": type(np.dtype("float32")),
                                 "mean_of_loss": loss.mean, "history": np.arange(4.0), **(hub_extra or {})},
                "resumed_keys": {"iter": True},
            },
        }
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class Payload:
    """Pickles as a call of ``func(*args)``: what an attacker puts in a checkpoint."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    import builtins
    import subprocess

    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        "builtins.exec": Payload(builtins.exec, touch),
        "builtins.eval": Payload(builtins.eval, f"exec({touch!r})"),
    }


def write_malicious(path: Path, payload: Payload, fmt: str) -> Path:
    """A checkpoint whose unpickling would run ``payload``: in a torch zip file, a legacy torch
    file, an mmagic-style file beside valid tensors, or a bare pickle."""
    tensors = {"out.2.weight": torch.zeros(6, 32, 3, 3)}
    if fmt == "zip":
        torch.save({**tensors, "evil": payload}, path)
    elif fmt == "legacy":
        torch.save({**tensors, "evil": payload}, path, _use_new_zipfile_serialization=False)
    elif fmt == "mmagic-hub":
        torch.save({"state_dict": tensors, "message_hub": {"runtime_info": {"x": payload}}}, path,
                   _use_new_zipfile_serialization=False)
    elif fmt == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        raise ValueError(fmt)
    return path


def pickle_globals(path: Path) -> set[str]:
    """The globals a checkpoint's pickles name (read with pickletools: nothing is executed)."""
    import io
    import pickletools
    import zipfile

    streams = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            streams = [io.BytesIO(z.read(n)) for n in z.namelist() if n.endswith(".pkl")]
    else:
        streams = [io.BytesIO(path.read_bytes())]
    found = set()
    for f in streams:
        with contextlib.suppress(Exception):  # legacy files hold raw storage bytes after the pickles
            while True:
                ops = list(pickletools.genops(f))
                found |= {_py3_name(*arg.split(" ")) for op, arg, _ in ops if op.name == "GLOBAL"}
                if not ops:
                    break
    return found


def _py3_name(module: str, name: str) -> str:
    """Protocol-2 pickles spell builtins as __builtin__ (as the unpickler maps them back)."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
