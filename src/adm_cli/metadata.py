"""The metadata of a safetensors file, read from its header without importing torch.

``adm models``, the cache's checks and `adm sample`'s checks of its request read only this (the
architecture config, the registry name); safetensors' "pt" framework would import torch for it,
seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import AnyConfig, config_from_dict
from .errors import ConfigError, WeightsError
from .formats import describe

STORED_DTYPES = ("float32", "float16", "bfloat16")  # what `adm convert-weights --dtype` writes


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # (the header only; no tensor is read)
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise WeightsError(describe(path) or f"{path} is not a readable safetensors file ({exc})") from None


def read_config(path: str | Path) -> AnyConfig:
    meta = read_metadata(path)
    if "adm_config" not in meta:
        raise WeightsError(f"{path} has no adm_config metadata: convert it with `adm convert-weights`")
    try:
        data = json.loads(meta["adm_config"])
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return config_from_dict(data)
    except (ValueError, ConfigError) as exc:
        raise WeightsError(f"{path}: bad adm_config metadata ({exc})") from None
