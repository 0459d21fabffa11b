"""The ADM_* environment variables that change how a run goes, read and checked without torch.

(ADM_HOME, ADM_MIRROR and ADM_REGISTRY name places and are read where they are used.) A value
that is neither on nor off, or no batch size, is refused in one line rather than taken as
either: ADM_WINOGRAD=false once left Winograd on without a word.
"""

from __future__ import annotations

import os

from .errors import UsageError

TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")
CPU_BATCH = 4  # CPU throughput is flat beyond a few images; small batches finish images sooner.


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off variable (ADM_OFFLINE, ADM_WINOGRAD, ADM_FUSED): 1/0, true/false, yes/no,
    on/off in any case; unset or empty: ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() not in TRUE + FALSE:
        raise UsageError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")
    return raw.lower() in TRUE


def cpu_batch_size() -> int:
    """``ADM_CPU_BATCH`` (a positive integer), else ``CPU_BATCH``."""
    value = os.environ.get("ADM_CPU_BATCH", "").strip()
    if not value:
        return CPU_BATCH
    if not (value.isascii() and value.isdigit()) or int(value) < 1:  # isdigit alone takes "²"
        raise UsageError(f"ADM_CPU_BATCH must be a positive integer, got {value!r}")
    return int(value)


def check_env() -> None:
    """Read every variable a sampling run reads, so that a bad value is refused before anything
    is fetched or written (and, at the command line, before torch is imported). ADM_CPU_BATCH
    is checked wherever it is set, though a CUDA device sizes its batches from free memory."""
    env_switch("ADM_OFFLINE", default=False)
    env_switch("ADM_FUSED")
    env_switch("ADM_WINOGRAD")
    cpu_batch_size()
