"""``adm_cli.fused``'s launch tunables as the benchmarks name them on their command lines.

- skip_add's GEMM: "M:N:K:WARPS:STAGES[:ONE_LOOP]" (rows, output and input channels per tile,
  warps, pipeline stages; ONE_LOOP 1: the decoder's two inputs in one K loop, default 0);
- the residual add's statistics epilogue: "ROWS:TILE:WARPS" (rows per statistics block, elements
  per program tile, warps);
- the reductions' row loops (the statistics kernel, the norm backward's sums, the residual add's
  statistics loop): "STAGES:PPS" (pipeline stages, 1 a plain loop; reduction programs per
  multiprocessor).

ops.py times several of each side by side; bench.py runs whole steps with one (``--skip-gemm``,
``--add-stats``, ``--stats-loop``); ``python benchmarks/tunables.py OPS.json...`` prints those of ops.py's rows
that pay (``picks``), for gpu_session.sh.
"""

from __future__ import annotations

import contextlib
import json
import sys

from adm_cli import fused

GEMM = ("_GEMM_M", "_GEMM_N", "_GEMM_K", "_GEMM_WARPS", "_GEMM_STAGES", "_GEMM_ONE_LOOP")
ADD_STATS = ("_RESIDUAL_STATS_ROWS", "_RESIDUAL_STATS_TILE", "_RESIDUAL_STATS_WARPS")
STATS_LOOP = ("_LOOP_STAGES", "_PROGRAMS_PER_SM")


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


def stats_loop(spec: str) -> dict:
    """{fused attribute: value} from "STAGES:PPS"; ValueError (one line) if malformed."""
    vals = spec.split(":")
    if len(vals) != 2 or not all(v.isdigit() and int(v) >= 1 for v in vals):
        raise ValueError(f"statistics loop {spec!r}: want STAGES:PPS (pipeline stages, programs per "
                         "multiprocessor), positive integers")
    return dict(zip(STATS_LOOP, (int(v) for v in vals)))


def apply(values: dict, module=fused) -> None:
    """Set ``module``'s attributes (``fused``'s tunables, or ``layers``' switches) for the rest of
    the process (bench.py: one setting per run)."""
    for name, v in values.items():
        setattr(module, name, v)


@contextlib.contextmanager
def tuned(values: dict, module=fused):
    """``module``'s attributes set to ``values`` for the block, restored after it (ops.py: several
    settings side by side; bench.py --variant)."""
    saved = {name: getattr(module, name) for name in values}
    apply(values, module)
    try:
        yield
    finally:
        apply(saved, module)


SHIPPED_GEMM = "skip_add 128:128:64:4:3"
PLAIN_ADD = "add, norm"


def shipped_stats_loop() -> str:
    """The statistics loop as shipped, "STAGES:PPS" (ops.py labels its rows "stats STAGES:PPS")."""
    return f"{fused._LOOP_STAGES}:{fused._PROGRAMS_PER_SM}"


def picks(rows: list[dict], margin: float = 0.97) -> tuple[str, str, str]:
    """bench.py's arguments for the candidates among ops.py's rows that beat the shipped form by
    ``margin`` over a forward's calls (time x calls, summed over the shapes): the skip GEMM's
    tiles against the shipped ones ("--skip-gemm SPEC"), the residual add's statistics
    geometry with the next norm against the plain add and norm ("--set RESIDUAL_STATS=on
    --add-stats SPEC"), and the statistics loop against the shipped one ("--stats-loop SPEC");
    "" where none does, or where a form has no rows."""
    total: dict[tuple, float] = {}
    for r in rows:
        form = r.get("form", "")
        tile = r["group"] == "skip" and form.startswith("skip_add ") and form[9:10].isdigit()
        if "ms" in r and (tile or r["group"] in ("addnorm", "stats")):
            total[r["group"], form] = total.get((r["group"], form), 0.0) + r["ms"] * r["calls"]

    def best(group: str, shipped: str) -> str | None:
        base = total.pop((group, shipped), None)
        cands = {f: t for (g, f), t in total.items() if g == group}
        if not base or not cands:
            return None
        form, t = min(cands.items(), key=lambda kv: kv[1])
        return form if t < margin * base else None

    gemm_form, add_form = best("skip", SHIPPED_GEMM), best("addnorm", PLAIN_ADD)
    loop_form = best("stats", "stats " + shipped_stats_loop())
    return ("" if gemm_form is None else "--skip-gemm " + gemm_form.split()[1],
            "" if add_form is None else "--set RESIDUAL_STATS=on --add-stats " + add_form.split()[2].rstrip(","),
            "" if loop_form is None else "--stats-loop " + loop_form.split()[1])


def _rows(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return json.load(f)["rows"]
    except (OSError, ValueError, KeyError):  # a call cut short: the other files' rows still count
        return []


if __name__ == "__main__":  # gpu_session.sh: "SKIP_ARGS|ADD_ARGS|LOOP_ARGS"
    print("|".join(picks([r for path in sys.argv[1:] for r in _rows(path)])))
