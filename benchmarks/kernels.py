"""Launch geometry of the fused kernels (fused.py): a real sampling step of ours, timed under
several settings, with the GPU time of each kernel.

    python benchmarks/kernels.py --cases ddim-256,ddpm-512-guided     # on a GPU
    python benchmarks/kernels.py --cpu-small --repeats 1              # smoke run (Triton's interpreter)

A setting is TILE:WARPS:PPS[:p]: elements per program tile, warps per program, reduction
programs per multiprocessor, and (``:p``) the statistics kernel's prefetching loop
(``fused._TILE``, ``_WARPS``, ``_PROGRAMS_PER_SM``, ``_STATS_PREFETCH``). Why these: the
statistics kernel loops over its rows one tile at a time, so the bytes in flight per
multiprocessor are about (resident programs) x TILE x 2; on an H200 it read at roughly half the
rate of the apply pass (4.9 vs 6.8 ms per 256x256 step for half the bytes, 7.4 vs 9.7 at 512).
Its two float32 accumulators may cap the resident programs below PPS, which ``:p`` works around
by keeping a second tile's load in flight per program. The networks and the step are
bench.py's (ours only). Per setting: one warm-up run (Triton compiles the new variants), the
timed runs (median ms per step), and one profiled run whose GPU time is summed per kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

if not torch.cuda.is_available():  # the kernels run in Triton's interpreter (before Triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

from adm_cli import fused  # noqa: E402

KERNELS = ("stats", "finalize", "apply", "residual_add", "bwd_stats", "bwd_apply")
DEFAULT_SETTINGS = "4096:4:4,4096:4:4:p,4096:4:8,4096:4:16,4096:4:8:p,8192:8:8,2048:4:8"


def parse_settings(text: str) -> list[tuple[int, int, int, bool]]:
    out = []
    for item in text.split(","):
        parts = item.split(":")
        prefetch = parts[3:] == ["p"]
        try:
            if len(parts) != 3 + prefetch:
                raise ValueError
            tile, warps, pps = (int(v) for v in parts[:3])
        except ValueError:
            raise SystemExit(f"error: setting {item!r} is not TILE:WARPS:PPS or TILE:WARPS:PPS:p") from None
        if tile & (tile - 1) or warps & (warps - 1) or min(tile, warps, pps) < 1:
            raise SystemExit(f"error: setting {item!r}: TILE and WARPS must be powers of two, PPS >= 1")
        out.append((tile, warps, pps, prefetch))
    return out


def _label(tile: int, warps: int, pps: int, prefetch: bool) -> str:
    return f"{tile}:{warps}:{pps}" + (":p" if prefetch else "")


def kernel_times(side: bench.Side, device: torch.device) -> dict[str, float]:
    """GPU ms per step of each fused kernel and of everything else (one profiled run)."""
    from torch.profiler import ProfilerActivity, profile

    bench.sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        side.run()
        bench.sync(device)
    totals = dict.fromkeys((*KERNELS, "other"), 0.0)
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        us = evt.self_cuda_time_total if us is None else us
        name = next((k for k in KERNELS if evt.key == k or evt.key.startswith(k + "_")), "other")
        totals[name] += us / 1e3 / side.steps
    return totals


def run(case_names: list[str], settings: list[tuple[int, int, int, bool]], args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = argparse.Namespace(cpu_small=args.cpu_small or device.type != "cuda", batch=args.batch, compile=False,
                              compile_mode=None, channels_last="auto", fused="on", dtype="auto", steps=args.steps,
                              cuda_graph=False)
    saved = fused._TILE, fused._WARPS, fused._PROGRAMS_PER_SM, fused._STATS_PREFETCH
    rows = []
    try:
        for name in case_names:
            _, batch, ours, ref, _ = bench.make_case(bench.CASES[name], opts, device)
            del ref  # only ours is timed here
            for setting in settings:
                fused._TILE, fused._WARPS, fused._PROGRAMS_PER_SM, fused._STATS_PREFETCH = setting
                ours.times.clear()
                ours.run()  # warm-up: Triton compiles this geometry's variants
                for _ in range(args.repeats):
                    ours.timed(device)
                row = {"case": name, "batch": batch, "setting": _label(*setting),
                       "ms": statistics.median(ours.times) * 1e3}
                if device.type == "cuda":
                    row["kernels_ms"] = kernel_times(ours, device)
                rows.append(row)
                print(f"{name} {row['setting']}: {row['ms']:.1f} ms/step", file=sys.stderr, flush=True)
    finally:
        fused._TILE, fused._WARPS, fused._PROGRAMS_PER_SM, fused._STATS_PREFETCH = saved
    return rows


def table(rows: list[dict]) -> str:
    cols = [k for k in (*KERNELS, "other") if any(r.get("kernels_ms", {}).get(k) for r in rows)]
    head = ("case", "setting", "ms/step", *(f"{k} ms" for k in cols))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], r["setting"], f"{r['ms']:.1f}"]
        cells += [f"{r['kernels_ms'][k]:.2f}" for k in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="ddim-256,ddpm-512-guided", help=f"from: {', '.join(bench.CASES)}")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated TILE:WARPS:PPS[:p] "
                   f"(default {DEFAULT_SETTINGS}; the first is the shipped one)")
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-small", action="store_true", help="bench.py's shrunk networks (automatic without CUDA)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in bench.CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}")
    rows = run(names, parse_settings(args.settings), args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
