"""``adm_cli.fused``'s launch tunables as the benchmarks name them on their command lines.

- skip_add's GEMM: "M:N:K:WARPS:STAGES[:ONE_LOOP]" (rows, output and input channels per tile,
  warps, pipeline stages; ONE_LOOP 1: the decoder's two inputs in one K loop, default 0);
- the residual add's statistics epilogue: "ROWS:TILE:WARPS" (rows per statistics block, elements
  per program tile, warps).

ops.py times several of each side by side; bench.py runs whole steps with one (``--skip-gemm``,
``--add-stats``).
"""

from __future__ import annotations

import contextlib

from adm_cli import fused

GEMM = ("_GEMM_M", "_GEMM_N", "_GEMM_K", "_GEMM_WARPS", "_GEMM_STAGES", "_GEMM_ONE_LOOP")
ADD_STATS = ("_RESIDUAL_STATS_ROWS", "_RESIDUAL_STATS_TILE", "_RESIDUAL_STATS_WARPS")


def gemm(spec: str) -> dict:
    """{fused attribute: value} from "M:N:K:WARPS:STAGES[:ONE_LOOP]"; ValueError (one line) if malformed."""
    vals = spec.split(":")
    if len(vals) not in (5, 6) or not all(v.isdigit() for v in vals) or min(int(v) for v in vals[:5]) < 1 \
            or (len(vals) == 6 and vals[5] not in ("0", "1")):
        raise ValueError(f"skip_add tiles {spec!r}: want M:N:K:WARPS:STAGES[:ONE_LOOP], positive integers, "
                         "ONE_LOOP 0 or 1")
    vals = [int(v) for v in vals] + [0] * (6 - len(vals))
    return dict(zip(GEMM, vals[:5] + [bool(vals[5])]))


def add_stats(spec: str) -> dict:
    """{fused attribute: value} from "ROWS:TILE:WARPS"; ValueError (one line) if malformed."""
    vals = spec.split(":")
    if len(vals) != 3 or not all(v.isdigit() and int(v) >= 1 for v in vals):
        raise ValueError(f"residual add statistics geometry {spec!r}: want ROWS:TILE:WARPS, positive integers")
    return dict(zip(ADD_STATS, (int(v) for v in vals)))


def apply(values: dict) -> None:
    """Set ``fused``'s tunables for the rest of the process (bench.py: one setting per run)."""
    for name, v in values.items():
        setattr(fused, name, v)


@contextlib.contextmanager
def tuned(values: dict):
    """``fused``'s tunables set to ``values`` for the block, restored after it (ops.py: several
    settings side by side)."""
    saved = {name: getattr(fused, name) for name in values}
    apply(values)
    try:
        yield
    finally:
        apply(saved)
