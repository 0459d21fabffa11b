"""What the fused GPU path's statistics kernel reads per U-Net forward, at full size, on any machine.

    python benchmarks/reads.py                                  # the three bench.py U-Nets
    python benchmarks/reads.py --models 256x256_diffusion --batch 16

The statistics pass of the fused GroupNorm reads every norm's input once (``fused.stats``); on an
H100 it took 5.7 of a 68 ms DDIM step at 256x256 (session 10). Two things spare it reads: the
decoder's norms reuse the skip connections' statistics that the encoder took
(``layers.SHARED_STATS``), and ``skip_add``, the direct input conv and the closing residual add
hand their outputs' statistics to the next norm (``layers.SKIP_STATS``, ``IN_STATS``,
``RESIDUAL_STATS``; the last two off by default since session 14, whose H200 timed their
epilogues dearer than the reads they spare: fewer reads are not always less time).
This counts the elements read under each setting by running the full-size network on PyTorch's
meta device (shapes only, nothing computed or allocated), with the fused path switched on as on
a GPU and its kernel launches only recorded. Exact for the launch decisions the host makes; the
time saved is for a GPU to say (``bench.py --set``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from adm_cli import fused, layers  # noqa: E402
from adm_cli.config import PRESETS, UNetConfig  # noqa: E402
from adm_cli.models import build_model  # noqa: E402

MODELS = ("256x256_diffusion", "512x512_diffusion", "64x64_diffusion")
SWITCHES = ("SHARED_STATS", "SKIP_STATS", "IN_STATS", "RESIDUAL_STATS")
SETTINGS = {"none": (False,) * 4, "SHARED_STATS": (True, False, False, False),
            "+ SKIP_STATS": (True, True, False, False), "+ IN_STATS": (True, True, True, False),
            "+ RESIDUAL_STATS": (True,) * 4}


def count(model_name: str, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Elements the statistics kernel reads in one forward of ``model_name``, per setting."""
    cfg = PRESETS[model_name]
    model = build_model(cfg).to(dtype).to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, layers.GroupNorm32):
            m.fused = True
    model = model.to("meta")
    reads = [0]

    def launch(name, grid, *args, **meta):
        if name == "stats":
            reads[0] += args[0].numel() + (args[1].numel() if meta["TWO"] else 0)

    def nhwc(fn):  # (meta convolutions return NCHW; cuDNN's keep channels_last, which the kernels need)
        return lambda *a, **k: fn(*a, **k).contiguous(memory_format=torch.channels_last)

    saved = (fused._launch, fused.gemm_runs, F.conv2d, F.conv_transpose2d, *(getattr(layers, s) for s in SWITCHES))
    fused._launch, fused.gemm_runs = launch, lambda h: True  # (half precision on a GPU)
    F.conv2d, F.conv_transpose2d = nhwc(F.conv2d), nhwc(F.conv_transpose2d)
    r = cfg.image_size
    x = torch.empty(batch, cfg.in_channels, r, r, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    kw = {"y": torch.zeros(batch, dtype=torch.long, device="meta")} if cfg.class_cond else {}
    if cfg.is_super_res:
        kw["low_res"] = torch.empty(batch, cfg.in_channels, r // 4, r // 4, device="meta")
    out = {}
    try:
        for label, setting in SETTINGS.items():
            for switch, on in zip(SWITCHES, setting):
                setattr(layers, switch, on)
            reads[0] = 0
            with torch.no_grad():
                model(x, t, **kw)
            out[label] = reads[0]
    finally:
        fused._launch, fused.gemm_runs, F.conv2d, F.conv_transpose2d = saved[:4]
        for switch, on in zip(SWITCHES, saved[4:]):
            setattr(layers, switch, on)
    return out


def main(argv=None) -> dict[str, dict[str, int]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated config presets")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if not isinstance(PRESETS.get(n), UNetConfig)]
    if unknown:
        p.error(f"not a U-Net preset: {', '.join(unknown)}")
    rows = {}
    print(f"| model | batch | {' | '.join(SETTINGS)} |\n|---|---|" + "---|" * len(SETTINGS))
    for name in names:
        rows[name] = row = count(name, args.batch)
        base = row["none"]
        cells = [f"{v / 1e6:.1f}M ({1 - v / base:.1%} fewer)" if k != "none" else f"{v / 1e6:.1f}M"
                 for k, v in row.items()]
        print(f"| {name} | {args.batch} | {' | '.join(cells)} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
