"""Single ops of the fused GPU path against their plainer forms, at one model's real shapes.

    python benchmarks/ops.py --model 256x256_diffusion --batch 16     # on a GPU
    python benchmarks/ops.py --small --repeats 2                     # smoke run (CPU, interpreter)

Each row is one op at one shape: the median time of ``--repeats`` timed calls (after a warm-up
call, which compiles Triton's variants and runs cuDNN's algorithm search), the number of such
calls in one U-Net forward, and the largest difference of each form's output from the first
form's (relative to its largest value). The forms (``layers``' switches):

- skip: a block's closing add with its 1x1 skip conv. "gemms+add": cuBLAS (``conv1x1_cat``, or
  one GEMM without a skip connection) then ``add_bias``; "skip_add M:N:K:W:S": the one Triton
  GEMM (``fused.skip_add``) at tiles of M rows, N output and K input channels, W warps, S stages,
  "M:N:K:W:S:1" the same with the decoder's two inputs in one K loop (``fused._GEMM_ONE_LOOP``);
  "skip_add +stats": the shipped tiles, taking the output's statistics in the epilogue (as inside
  the U-Net's ``shared_statistics``, where the tile divides the pixels per sample), and "(stats
  pass over y)" the statistics kernel over the output, which that spares the next norm.
- add: a block's closing residual add (no skip conv; the down and up blocks' skip resampled on
  the fly). "add": ``fused.add_bias``; "add +stats R:T:W": the same taking its output's
  statistics (inside ``shared_statistics``; ``layers.RESIDUAL_STATS``) per block of R rows, in
  program tiles of T elements, W warps (``--add-stats``); "(stats pass over y)": the statistics
  kernel that spares.
- addnorm: the same adds followed by the next norm (GroupNorm + SiLU, ``group_norm_act``), which
  after "add +stats" only finalizes the kept blocks (more blocks for smaller R) and applies,
  after "add" also runs the statistics pass: the whole of what the epilogue changes.
- stats: the statistics kernel and the finalize (``fused._affine``: a norm's first two kernels) at
  every input the statistics kernel reads in one forward of the model as sampled (recorded from a
  fused forward with random weights: the inputs whose statistics are taken in an epilogue or kept
  for a second reader are not among them). "stats S:P": its row loop in S pipeline stages (1: the
  plain loop) at P reduction programs per multiprocessor (``--stats-loops``; ``fused._LOOP_STAGES``,
  ``_PROGRAMS_PER_SM``), the shipped setting first.
- up: the norm + SiLU of a BigGAN up block and its first conv. "plain": the norm written
  upsampled, then the 3x3 conv; "transposed": the norm at the low resolution, then the stride-2
  transposed conv (``fused.conv_up``); "folded": a 2x2 conv to 4x the channels at the low
  resolution, then the four output phases copied into place.
- in / out: the network's input conv (3 channels, with its bias) and output conv (6 channels):
  cuDNN's own vs ``fused.conv_in`` / ``fused.conv_out`` (padded to 8 channels, bias as weights);
  for the input conv also "direct N:W" (``fused.conv_in_direct``, the Triton conv, N output
  channels per program, W warps), "direct +stats" (the shipped tile, taking the output's
  statistics as inside ``shared_statistics``) and "(stats pass over y)", which that spares.

Only ours is timed here (the reference has none of these forms); bench.py's --set runs whole
steps with each switch, against the reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the kernels run in Triton's interpreter (before Triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adm_cli import fast, fused  # noqa: E402
from adm_cli.config import get_preset  # noqa: E402

import tunables  # noqa: E402  (benchmarks/)

DEFAULT_TILES = ("128:128:64:4:3,128:128:64:4:3:1,128:128:64:8:3,128:128:64:8:3:1,128:64:64:4:4,64:128:64:4:4,"
                 "128:256:64:8:3,256:128:64:8:3")

DEFAULT_ADD_STATS = "128:4096:4,16:4096:4,16:8192:8,16:16384:8"

DEFAULT_STATS_LOOPS = "2:4,3:4,4:4,1:5,2:5,4:5"


def _levels(cfg):
    """(resolution, channels) per level of the U-Net."""
    return [(cfg.image_size >> lvl, int(m * cfg.num_channels)) for lvl, m in enumerate(cfg.mults)]


def skip_shapes(cfg) -> dict[tuple, int]:
    """{(resolution, C_x, C_skip or 0, C_out): calls per forward} for the blocks with a 1x1 skip conv."""
    levels = _levels(cfg)
    out: dict[tuple, int] = {}
    ch = levels[0][1]
    skips = [ch]
    for lvl, (res, width) in enumerate(levels):  # encoder
        for _ in range(cfg.num_res_blocks):
            if width != ch:
                key = (res, ch, 0, width)
                out[key] = out.get(key, 0) + 1
            ch = width
            skips.append(ch)
        if lvl != len(levels) - 1:
            skips.append(ch)
    for lvl in reversed(range(len(levels))):  # decoder: every block takes cat(h, skip)
        res, width = levels[lvl]
        for _ in range(cfg.num_res_blocks + 1):
            key = (res, ch, skips.pop(), width)
            out[key] = out.get(key, 0) + 1
            ch = width
    return out


def up_shapes(cfg) -> dict[tuple, int]:
    """{(low resolution, channels): calls per forward} for the BigGAN up blocks."""
    return {(res, width): 1 for lvl, (res, width) in enumerate(_levels(cfg)) if lvl}


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: compiles, algorithm search
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref.float() - got.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _forms_skip(n, res, cx, cs, co, dtype, device, tiles):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda c: _nhwc(torch.randn(n, c, res, res, generator=g).to(device, dtype))  # noqa: E731
    x, h = mk(cx), mk(co)
    x2 = mk(cs) if cs else None
    conv = torch.nn.Conv2d(cx + cs, co, 1).to(device, dtype).to(memory_format=torch.channels_last)
    bias = torch.randn(co, generator=g).to(device, dtype)
    w_t = fused.skip_weight(conv)

    def plain():
        s = fused.conv1x1_cat(conv, x, x2) if x2 is not None else fused.conv_nobias(conv, x)
        return fused.add_bias(h, s, bias)
    forms = [("gemms+add", plain)]
    for spec in tiles:
        def gemm(values=tunables.gemm(spec)):
            with tunables.tuned(values):
                return fused.skip_add(h, x, x2, w_t, bias)
        forms.append(("skip_add " + spec, gemm))

    def with_stats():  # the shipped tiles, the output's statistics out of the epilogue
        with fused.shared_statistics():
            return fused.skip_add(h, x, x2, w_t, bias)
    y = fused.skip_add(h, x, x2, w_t, bias, stats=False)
    return forms + [("skip_add +stats", with_stats), ("(stats pass over y)", _stats_pass(y))]


def _stats_pass(y):
    """The statistics kernel over y, which an op that takes its output's statistics spares the
    next norm (returns y, for the diff)."""
    def run():
        fused._statistics(y)
        return y
    return run


def add_shapes(cfg) -> dict[tuple, int]:
    """{(resolution, channels, resample): calls per forward} for the closing residual adds (blocks
    without a skip conv): same-width blocks, the down blocks (resample "down": the skip read at
    2x the output's size) and the up blocks ("up")."""
    levels = _levels(cfg)
    out: dict[tuple, int] = {}

    def add(key):
        out[key] = out.get(key, 0) + 1

    ch = levels[0][1]
    for lvl, (res, width) in enumerate(levels):  # encoder
        for _ in range(cfg.num_res_blocks):
            if width == ch:
                add((res, ch, None))
            ch = width
        if lvl != len(levels) - 1 and cfg.resblock_updown:
            add((res // 2, ch, "down"))
    add((levels[-1][0], ch, None))  # the middle block's two
    add((levels[-1][0], ch, None))
    if cfg.resblock_updown:
        for res, width in levels[:-1]:  # decoder: each level's up block, into that level
            add((res, levels[levels.index((res, width)) + 1][1], "up"))
    return out


def _forms_add(n, res, c, resample, dtype, device, geometries, norm=False):
    g = torch.Generator(device="cpu").manual_seed(3)
    rres = {None: res, "down": 2 * res, "up": res // 2}[resample]
    x = _nhwc(torch.randn(n, c, res, res, generator=g).to(device, dtype))
    r = _nhwc(torch.randn(n, c, rres, rres, generator=g).to(device, dtype))
    bias = torch.randn(c, generator=g).to(device, dtype)
    gamma, beta = 1 + 0.1 * torch.randn(c, generator=g).to(device), 0.1 * torch.randn(c, generator=g).to(device)
    then = (lambda y: fused.group_norm_act(y, gamma, beta)) if norm else (lambda y: y)
    forms = [("add" + (", norm" if norm else ""),
              lambda: then(fused.add_bias(x, r, bias, resample=resample, stats=False)))]
    for geo in geometries:
        def with_stats(geo=geo):
            with tunables.tuned(tunables.add_stats(geo)), fused.shared_statistics():
                return then(fused.add_bias(x, r, bias, resample=resample))
        forms.append((f"add +stats {geo}" + (", norm" if norm else ""), with_stats))
    if not norm:
        forms.append(("(stats pass over y)", _stats_pass(fused.add_bias(x, r, bias, resample=resample, stats=False))))
    return forms


def stats_calls(cfg, n, dtype, device) -> dict[tuple, int]:
    """{(resolution, channels, channels of a second input or 0, the input bias's shape or None):
    calls} of the statistics kernel in one forward of the model, fused, as a sampler runs it
    (recorded: which inputs still need the pass depends on the switches of ``layers``)."""
    from adm_cli.models import build_model

    with torch.device(device):
        net = build_model(cfg).eval()
    net = fast.prepare(net, device=device, dtype=str(dtype).replace("torch.", ""), fused_kernels=True)
    g = torch.Generator(device="cpu").manual_seed(4)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    t = torch.full((n,), cfg.diffusion_steps // 2, device=device)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g).to(device) if cfg.class_cond else None
    calls: dict[tuple, int] = {}
    real = fused._statistics

    def spy(x, x2=None, in_bias=None):
        key = (x.shape[-1], x.shape[1], 0 if x2 is None else x2.shape[1],
               None if in_bias is None else tuple(in_bias.shape))
        calls[key] = calls.get(key, 0) + 1
        return real(x, x2, in_bias)
    with tunables.tuned({"_statistics": spy}):
        net(x, t, y)
    return calls


def _forms_stats(n, res, c1, c2, ib, dtype, device, loops):
    g = torch.Generator(device="cpu").manual_seed(5)
    x = _nhwc((torch.randn(n, c1, res, res, generator=g) + 3.0).to(device, dtype))
    x2 = _nhwc(torch.randn(n, c2, res, res, generator=g).to(device, dtype)) if c2 else None
    in_bias = torch.randn(ib, generator=g).to(device, dtype) if ib else None
    gamma, beta = (1 + 0.1 * torch.randn(c1 + c2, generator=g)).to(device), torch.zeros(c1 + c2, device=device)
    forms = []
    for spec in loops:
        def norm_stats(values=tunables.stats_loop(spec)):
            with tunables.tuned(values):
                return fused._affine(x, gamma, beta, 1e-5, in_bias, None, None, x2)
        forms.append(("stats " + spec, norm_stats))
    return forms


def _forms_up(n, res, c, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = _nhwc(torch.randn(n, c, res, res, generator=g).to(device, dtype))
    gamma, beta = (1 + 0.1 * torch.randn(c, generator=g)).to(device), (0.1 * torch.randn(c, generator=g)).to(device)
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
    w_up = fused.up_weight(conv)
    # the CPU path's folding (fast.PrepackedConv2d.upsampled), summed in float32
    w4 = fast._fold_for_upsample(conv.weight.float()).to(dtype)

    def folded():
        y = F.conv2d(fused.group_norm_act(x, gamma, beta), w4, None, 1, 1)  # [N, 4C, res + 1, res + 1]
        return fast.interleave_phases(y, c)
    return [("plain", lambda: fused.conv_nobias(conv, fused.group_norm_act(x, gamma, beta, resample="up"))),
            ("transposed", lambda: fused.conv_up(fused.group_norm_act(x, gamma, beta), w_up)),
            ("folded", folded)]


def _forms_io(n, res, cin, cmid, cout, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(2)
    x = _nhwc(torch.randn(n, cin, res, res, generator=g).to(device, dtype))
    a = _nhwc(torch.randn(n, cmid, res, res, generator=g).to(device, dtype))
    conv_in = torch.nn.Conv2d(cin, cmid, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
    conv_out = torch.nn.Conv2d(cmid, cout, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
    w_in = fused.in_weight(conv_in)
    w_out, b_out = fused.out_weight(conv_out)
    matrix, bias = fused.in_matrix(conv_in)
    forms_in = [("cuDNN + bias", lambda: conv_in(x)), ("conv_in", lambda: fused.conv_in(x, w_in, conv_in.padding))]
    for tile in ((128, 8), (128, 4), (64, 4)):
        def direct(tile=tile):
            with tunables.tuned(dict(_CONV_IN_N=tile[0], _CONV_IN_WARPS=tile[1])):
                return fused.conv_in_direct(x, matrix, bias, conv_in.kernel_size)
        forms_in.append(("direct N:W " + ":".join(map(str, tile)), direct))

    def with_stats():  # the shipped tile, the output's statistics out of the epilogue
        with fused.shared_statistics():
            return fused.conv_in_direct(x, matrix, bias, conv_in.kernel_size)
    y = fused.conv_in_direct(x, matrix, bias, conv_in.kernel_size, stats=False)
    forms_in += [("direct +stats", with_stats), ("(stats pass over y)", _stats_pass(y))]
    return (forms_in,
            [("cuDNN + bias", lambda: conv_out(a)),
             ("conv_out", lambda: fused.conv_out(a, w_out, b_out, cout, conv_out.padding))])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="256x256_diffusion", help="a U-Net preset (default 256x256_diffusion)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiles", default=DEFAULT_TILES, help="skip_add tiles M:N:K:WARPS:STAGES[:ONE_LOOP], "
                   "comma-separated")
    p.add_argument("--groups", default="skip,add,up,in,out", help="comma-separated, run in this order "
                   "(also: addnorm, stats)")
    p.add_argument("--add-stats", default=DEFAULT_ADD_STATS, help="the residual add's statistics geometries "
                   "ROWS:TILE:WARPS, comma-separated (the first: the shipped one)")
    p.add_argument("--stats-loops", default=DEFAULT_STATS_LOOPS, help="the statistics loop's STAGES:PPS, "
                   "comma-separated, timed after the shipped one")
    p.add_argument("--small", action="store_true", help="a shrunk model and batch (the default without CUDA)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset(args.model)
    n, dtype = args.batch, getattr(torch, args.dtype)
    if args.small or device.type != "cuda":
        cfg = cfg.replace(num_channels=32, image_size=8, channel_mult="1,2", num_res_blocks=1,
                          attention_resolutions="4", num_head_channels=32)
        n = min(n, 2)
        dtype = torch.float32 if device.type != "cuda" else dtype
    tiles = [t for t in args.tiles.split(",") if t]
    geometries = [t for t in args.add_stats.split(",") if t]
    shipped_loop = tunables.shipped_stats_loop()
    loops = [shipped_loop] + [t for t in args.stats_loops.split(",") if t and t != shipped_loop]
    try:
        for t in tiles:
            tunables.gemm(t)
        for t in geometries:
            tunables.add_stats(t)
        for t in loops:
            tunables.stats_loop(t)
    except ValueError as e:
        p.error(str(e))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    groups = args.groups.split(",")
    unknown = sorted(set(groups) - {"skip", "add", "addnorm", "stats", "up", "in", "out"})
    if unknown:
        p.error(f"--groups: unknown {', '.join(unknown)} (from skip, add, addnorm, stats, up, in, out)")
    rows = []

    def run(group, shape, count, forms):
        ref = None
        for name, fn in forms:
            try:
                ms = _time(fn, args.repeats, device)
                with torch.no_grad():
                    out = fn()
                ref = out if ref is None else ref
                rows.append(dict(group=group, shape=shape, form=name, ms=ms, calls=count, diff=_diff(ref, out)))
            except Exception as e:  # noqa: BLE001 - a form that fails must not lose the others
                rows.append(dict(group=group, shape=shape, form=name, error=f"{type(e).__name__}: {e}"[:200]))
            r = rows[-1]
            print(f"{group:5} {shape:28} {name:24} " + (f"{r['ms']:8.3f} ms x{count}  diff {r['diff']:.1e}"
                                                         if "ms" in r else r["error"]), flush=True)

    def skip():
        for (res, cx, cs, co), count in skip_shapes(cfg).items():
            run("skip", f"{res}^2 {cx}+{cs}->{co}", count, _forms_skip(n, res, cx, cs, co, dtype, device, tiles))

    def add(norm=False):
        for (res, c, resample), count in add_shapes(cfg).items():
            run("addnorm" if norm else "add", f"{res}^2 {c}" + (f" {resample}" if resample else ""), count,
                _forms_add(n, res, c, resample, dtype, device, geometries, norm))

    def stats():
        for (res, c1, c2, ib), count in stats_calls(cfg, n, dtype, device).items():
            run("stats", f"{res}^2 {c1}" + (f"+{c2}" if c2 else "") + (" +bias" if ib else ""), count,
                _forms_stats(n, res, c1, c2, ib, dtype, device, loops))

    def up():
        for (res, c), count in up_shapes(cfg).items():
            run("up", f"{res}^2 -> {2 * res}^2, {c}", count, _forms_up(n, res, c, dtype, device))

    res0, c0 = _levels(cfg)[0]
    io_forms = functools.cache(lambda: _forms_io(n, res0, cfg.in_channels, c0, cfg.out_channels, dtype, device))

    def io(which):
        if which == "in":
            run("in", f"{res0}^2 {cfg.in_channels}->{c0}", 1, io_forms()[0])
        else:
            run("out", f"{res0}^2 {c0}->{cfg.out_channels}", 1, io_forms()[1])

    with torch.no_grad():  # in the order given (a run cut short keeps the first groups' rows)
        for group in groups:
            {"skip": skip, "add": add, "addnorm": lambda: add(norm=True), "stats": stats, "up": up,
             "in": lambda: io("in"), "out": lambda: io("out")}[group]()
    totals: dict[tuple, float] = {}
    for r in rows:
        if "ms" in r:
            totals[(r["group"], r["form"])] = totals.get((r["group"], r["form"]), 0.0) + r["ms"] * r["calls"]
    print("\nper forward (sum over shapes of ms x calls):")
    for (group, form), ms in totals.items():
        print(f"  {group:5} {form:24} {ms:8.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "model": args.model, "batch": n, "dtype": str(dtype), "rows": rows}, f, indent=2)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
