"""The metadata of a safetensors file, read from its header without importing torch.

``adm models`` and the cache's checks read only this (the architecture config, the registry
name); safetensors' "pt" framework would import torch for it, seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from .errors import WeightsError

STORED_DTYPES = ("float32", "float16", "bfloat16")  # what `adm convert-weights --dtype` writes


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # (the header only; no tensor is read)
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
