"""The canonical weight file: safetensors with OpenAI's key names and the config in its metadata.

Metadata keys (all strings, as safetensors requires):
``adm_format`` = "1"; ``adm_config`` = the config as JSON (``config.to_dict()``); optional
``adm_preset``, ``adm_source_file``, ``adm_source_sha256``, ``adm_registry_name``.
Files are written to a temporary name beside the target and renamed when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from .config import AnyConfig
from .download import sha256_file
from .errors import OutputError, WeightsError
from .metadata import read_config, read_metadata  # noqa: F401 - torch-free; also weights.read_config, .read_metadata
from .models import build_model

FORMAT_VERSION = "1"


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, kept per (path, size, mtime) for the process: a run records
    the weights it sampled with by content, not by where the file lies (~1 s per GB)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def atomic_target(path: Path) -> Path:
    """A unique temporary path in ``path``'s folder (same filesystem, so rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".incomplete", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], config: AnyConfig,
                 metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a canonical file atomically; refuses to replace an existing one unless ``overwrite``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightsError(f"{path} already exists (use --force to overwrite)")
    meta = {"adm_format": FORMAT_VERSION, "adm_config": json.dumps(config.to_dict(), sort_keys=True)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors, storages = {}, set()
    for k, v in state_dict.items():
        t = v.detach().contiguous().cpu()
        storage = t.untyped_storage().data_ptr()
        if storage in storages:  # tied weights (one tensor under two names): safetensors wants
            t = t.clone()        # each name to own its bytes, so store a copy
        storages.add(storage)
        tensors[k] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_target(path)
    try:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except Exception as exc:  # noqa: BLE001 - safetensors wraps a full disk in its own error type
            raise OutputError(f"cannot write {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared cache wants the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[AnyConfig, dict[str, torch.Tensor]]:
    """(config, state_dict) of a canonical file."""
    from safetensors.torch import load_file

    config = read_config(path)
    return config, load_file(str(path), device=str(device))


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               config: AnyConfig | None = None) -> torch.nn.Module:
    """Build the network a canonical file describes and load its weights with strict=True."""
    file_config, state = load_weights(path)
    config = config or file_config
    with torch.device("meta"):
        model = build_model(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise WeightsError(f"{path} does not fit its config: {first[1].strip() if len(first) > 1 else first[0]}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
