"""adm-cli: OpenAI's ADM (guided diffusion) models: fetch, convert, sample.

The Python API lives in :mod:`adm_cli.api`; the building blocks are importable on their own:
``config`` (architectures), ``models`` (networks), ``schedule`` / ``samplers`` / ``guidance``
(diffusion), ``weights`` (the canonical safetensors files).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562): importing torch takes seconds, and the
# command line sets up its Ctrl-C and SIGTERM handling before it does.
_LAZY = {
    "SamplerSettings": "api", "Samples": "api", "generate": "api", "load_model": "api", "sample_batch": "api",
    "to_uint8": "api", "PRESETS": "config", "ClassifierConfig": "config", "UNetConfig": "config",
    "get_preset": "config", "AdmError": "errors", "Classifier": "models", "UNet": "models", "build_model": "models",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
