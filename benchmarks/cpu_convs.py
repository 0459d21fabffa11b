"""The CPU path's 3x3 convolutions, oneDNN's direct one against Winograd F(4x4, 3x3), per shape.

    python benchmarks/cpu_convs.py --model 64x64_diffusion --batch 4      # what winograd.worth_it is set from
    python benchmarks/cpu_convs.py --small --repeats 1                   # smoke run

Every 3x3, stride-1 convolution of one U-Net forward (shapes collected by running the model
once) is timed both ways, float32, channels_last, with the weights prepared once as the fast
path keeps them (oneDNN's packed layout; Winograd's transformed U). Each row: the input shape,
the output channels, the calls per forward, the median ms of each form, their ratio, what
``winograd.worth_it`` picks, and Winograd's error against a float64 convolution (max |error| /
max |output|, with oneDNN's beside it). The last line sums the forward's 3x3 time under each
choice: direct everywhere, the rule's pick, and the best per shape.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F

from adm_cli import fast, winograd
from adm_cli.config import get_preset
from adm_cli.models import build_model
from ops import _time  # the median of timed calls after a warm-up one (benchmarks/ops.py)

CPU = torch.device("cpu")


def conv_shapes(cfg, batch: int) -> Counter:
    """{(input shape, output channels): calls} for the 3x3 stride-1 convs of one forward of the
    fast path (where up blocks' first convs run as folded 2x2 convs: not counted)."""
    model = fast.prepare(build_model(cfg), device="cpu", dtype="float32", winograd_convs=False)
    seen: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.update([(tuple(a[0].shape), m.out_channels)]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d) and winograd.applies(m)]
    n, s = batch, cfg.image_size
    kw = {"y": torch.zeros(n, dtype=torch.long)} if cfg.class_cond else {}
    if cfg.is_super_res:
        kw["low_res"] = torch.zeros(n, 3, cfg.small_size, cfg.small_size)
    with torch.no_grad():
        model(torch.zeros(n, 3, s, s), torch.zeros(n, dtype=torch.long), **kw)
    for h in hooks:
        h.remove()
    return seen


def time_shape(shape: tuple, out_channels: int, repeats: int) -> dict:
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = F.silu(torch.randn(shape, generator=g)).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, c, 3, 3, generator=g) / (9 * c) ** 0.5
    bias = torch.randn(out_channels, generator=g)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(shape))
    u = winograd.transform_weight(weight)

    def direct():
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")

    def wino():
        return winograd.conv3x3(x, u, bias)

    tiled = h % winograd.TILE == 0 == w % winograd.TILE
    with torch.no_grad():
        want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        scale = want.abs().max().item()
        return {"shape": shape, "out": out_channels, "pick": winograd.worth_it(shape, out_channels),
                "direct_ms": _time(direct, repeats, CPU),
                "winograd_ms": _time(wino, repeats, CPU) if tiled else float("inf"),
                "direct_err": (direct().double() - want).abs().max().item() / scale,
                "winograd_err": (wino().double() - want).abs().max().item() / scale if tiled else None}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="64x64_diffusion", help="a preset (see adm_cli.config.PRESETS)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="a narrow 16x16 version of the model (smoke run)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.model)
    if args.small:
        cfg = cfg.replace(num_channels=32, num_res_blocks=1, image_size=16, channel_mult="1,2",
                          attention_resolutions="8", num_head_channels=32)
    print(f"{args.model}{' (small)' if args.small else ''}, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats}")
    print("| input | out | calls | direct ms | winograd ms | direct/winograd | rule picks | winograd err | direct err |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = {"direct": 0.0, "rule": 0.0, "best": 0.0}
    rows = []
    for (shape, out), calls in sorted(conv_shapes(cfg, args.batch).items(), key=lambda kv: -kv[0][0][2]):
        r = time_shape(shape, out, args.repeats)
        rows.append({**r, "calls": calls})
        ok = r["winograd_err"] is not None
        total["direct"] += calls * r["direct_ms"]
        total["rule"] += calls * (r["winograd_ms"] if r["pick"] else r["direct_ms"])
        total["best"] += calls * (min(r["direct_ms"], r["winograd_ms"]) if ok else r["direct_ms"])
        err = f"{r['winograd_err']:.1e}" if ok else "n/a"
        print(f"| {list(shape)} | {out} | {calls} | {r['direct_ms']:.2f} | {r['winograd_ms']:.2f} | "
              f"{r['direct_ms'] / r['winograd_ms']:.2f}x | {'winograd' if r['pick'] else 'direct'} | {err} | "
              f"{r['direct_err']:.1e} |")
    print(f"3x3 convs per forward: direct {total['direct']:.0f} ms, the rule {total['rule']:.0f} ms "
          f"({total['direct'] / total['rule']:.2f}x), best per shape {total['best']:.0f} ms "
          f"({total['direct'] / total['best']:.2f}x)")
    return rows


if __name__ == "__main__":
    main()
