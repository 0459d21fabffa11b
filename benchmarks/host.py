"""Host (Python + PyTorch dispatch) time of the fused GPU path, with every kernel launch stubbed out.

    python benchmarks/host.py                       # each fused op alone, launches stubbed
    python benchmarks/host.py --launch              # the same with real launches (CUDA)
    python benchmarks/host.py --step ddpm-64-guided # a whole sampling step of a bench.py case

Why: on an H200 the guided 64x64 step at batch 64 spent ~100 ms of host time against 52 ms of
GPU work (several hundred small launches), so what the fused path costs before its kernels even
start is worth knowing, and it can be measured on any machine.

Ops alone: tiny tensors (2x2 pixels), so that the few real PyTorch ops left (allocations, views)
cost what their dispatch costs. Medians over repeats of 200 calls. ``--launch`` keeps the real
launches (on CUDA, tiny kernels, synchronised once per 200 calls): the difference to the stubbed
rows is what Triton's launcher and the driver add per op.

``--step``: the case's full-size networks (every block, channel count and attention layer)
built for the smallest images they take (8x8 for 64x64 models, 32x32 at 256, 64x64 at 512;
attention kept at the same depths), prepared as on a GPU (fused kernels, channels_last; float32
here, with the Triton GEMMs that a GPU runs in half precision taken as they would be there), and
sampled through ``api.sample_batch``. The Triton launches are stubbed, and
convolutions, linear layers (GEMMs) and attention are replaced by stand-ins that only shape
their output (with the same autograd structure), so what remains is the host work that a GPU
run also does, minus the CUDA driver's launch cost and Triton's launcher (not measurable without
a GPU). ``--batch 1`` is the cleaner measure: at the case's own batch the few real elementwise
ops left (embeddings, sampler arithmetic) compute on the CPU what a GPU does in microseconds.
Reported: host ms per step, the best of 7 runs of 4 steps (the work is the same every run, so
the spread is the machine's: on this project's shared 2-core VM the same process varies up to
1.7x between runs, so compare two builds with ``--against OTHER/src``: both in one process, runs
alternating, and the ratio per pair), the Triton launches, convolutions, GEMMs and attention
calls per step, and the elements the statistics kernel reads per step (every level's images
shrink alike, so their ratio between two builds is the full-size one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "src"), HERE]
from adm_cli import fused  # noqa: E402


def timed(fn, calls: int = 200, repeats: int = 7, sync=lambda: None) -> float:
    for _ in range(calls // 4):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="ops alone: 64; --step: the case's own batch")
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--launch", action="store_true", help="ops alone, with their real kernel launches on CUDA "
                   "(the Triton launcher's and the driver's share, which the stubbed rows leave out)")
    p.add_argument("--step", default=None, metavar="CASE", help="time a whole sampling step of this bench.py case")
    p.add_argument("--steps", type=int, default=4, help="--step: sampler steps per timed run")
    p.add_argument("--against", default=None, metavar="SRC", help="--step: also time the adm_cli package in "
                   "folder SRC (e.g. another checkout's src/), alternating with this tree's, in one process")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if args.step:
        return step_host_time(args.step, args.batch, args.steps, args.repeats, args.against)
    if args.launch and not torch.cuda.is_available():
        raise SystemExit("--launch needs CUDA")
    device = torch.device("cuda" if args.launch else "cpu")
    sync = torch.cuda.synchronize if args.launch else (lambda: None)
    launches = []
    saved = fused._launch
    if not args.launch:
        fused._launch = lambda name, *a, **k: launches.append(name)
    try:
        n, c = args.batch or 64, args.channels
        x = torch.randn(n, c, 2, 2, device=device).contiguous(memory_format=torch.channels_last)
        w, b = torch.ones(c, device=device), torch.zeros(c, device=device)
        scale, shift = torch.randn(n, 2 * c, device=device).chunk(2, dim=1)
        dy = torch.randn_like(x)
        xg = x.clone().requires_grad_(True)

        def norm_sampling():
            with torch.no_grad():
                fused.group_norm_act(x, w, b, scale=scale, shift=shift)

        def norm_with_gradient():
            torch.autograd.grad(fused.group_norm_act(xg, w, b, scale=scale, shift=shift), xg, dy)

        def residual_add():
            with torch.no_grad():
                fused.add_bias(x, x, b)

        rows = {}
        for name, fn in (("norm, sampling (no grad)", norm_sampling), ("norm, forward + input gradient",
                         norm_with_gradient), ("residual add", residual_add)):
            launches.clear()
            fn()
            count = f"{len(launches)} launches (stubbed)" if not args.launch else "real launches"
            rows[name] = timed(fn, sync=sync)
            print(f"{name}: {rows[name]:.1f} us host, {count}", flush=True)
    finally:
        fused._launch = saved
    return rows


class _ShapeOnly(torch.autograd.Function):
    """Stands in for a convolution or linear layer: an output of the right shape and layout
    (uninitialised), and a gradient of the input's shape, at the cost of one allocation each."""

    @staticmethod
    def forward(ctx, x, shape, channels_last):
        ctx.like = (x.shape, channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)

    @staticmethod
    def backward(ctx, g):
        shape, channels_last = ctx.like
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=fmt), None, None


class _AttentionShapeOnly(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention (q, k, v -> q's shape with v's last size)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.shapes = q.shape, k.shape, v.shape
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    @staticmethod
    def backward(ctx, g):
        return tuple(g.new_empty(shape) for shape in ctx.shapes)


def _fake_attention(q, k, v, *args, **kwargs):
    return _AttentionShapeOnly.apply(q, k, v)


def _conv_out(x, w, stride, padding):
    s = stride if isinstance(stride, int) else stride[0]
    p_ = padding if isinstance(padding, int) else padding[0]
    k = w.shape[-1]
    return [(d + 2 * p_ - k) // s + 1 for d in x.shape[2:]]


def _fake_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return _ShapeOnly.apply(x, (x.shape[0], w.shape[0], *_conv_out(x, w, stride, padding)),
                            x.is_contiguous(memory_format=torch.channels_last))  # (bias: part of the conv)


def _fake_conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    s, p = (stride, stride) if isinstance(stride, int) else stride, (padding, padding) if isinstance(padding, int) \
        else padding
    size = [(x.shape[2 + i] - 1) * s[i] - 2 * p[i] + w.shape[2 + i] for i in range(2)]  # (fused.conv_up's case)
    return _ShapeOnly.apply(x, (x.shape[0], w.shape[1], *size), x.is_contiguous(memory_format=torch.channels_last))


def _fake_linear(x, w, b=None):
    return _ShapeOnly.apply(x, (*x.shape[:-1], w.shape[0]), False)


def _fake_matmul(a, b):
    return _ShapeOnly.apply(a, (*a.shape[:-1], b.shape[-1]), False)


def _package(src: str | None):
    """The ``adm_cli`` package to time: this tree's, or (``--against``) the one in the folder
    ``src``, imported under another name from a temporary copy so that both live in one process
    (its modules import each other relatively)."""
    import atexit
    import importlib
    import shutil
    import tempfile

    if src is None:
        return "adm_cli"
    found = os.path.join(src, "adm_cli")
    if not os.path.isfile(os.path.join(found, "fused.py")):
        raise SystemExit(f"--against: {src} holds no adm_cli package with a fused.py")
    root = tempfile.mkdtemp(prefix="adm-host-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # (imported from there until the process ends)
    shutil.copytree(found, os.path.join(root, "adm_cli_against"), ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    sys.path.insert(0, root)
    importlib.import_module("adm_cli_against")
    return "adm_cli_against"


def _step_runner(pkg: str, case, batch: int, steps: int):
    """Build the case's networks with package ``pkg`` (see the module docstring) and return
    (run one sampling call, the package's fused module, the networks)."""
    import importlib

    api, config, fast_, fused_, models = (importlib.import_module(f"{pkg}.{m}")
                                          for m in ("api", "config", "fast", "fused", "models"))
    names = [n for n in (case.unet, case.classifier) if n]
    size = max(2 ** (len(config.PRESETS[n].mults) - 1) for n in names)  # one pixel at the deepest level

    def tiny(name, res_field):
        cfg = config.PRESETS[name]
        ds = cfg.attention_ds  # keep attention at the same depths of the network
        mults = ",".join(f"{m:g}" for m in cfg.mults)
        return cfg.replace(image_size=size, channel_mult=mults, **{res_field: ",".join(str(size // d) for d in ds)})

    unet = models.build_model(tiny(case.unet, "attention_resolutions"))
    clf = models.build_model(tiny(case.classifier, "classifier_attention_resolutions")) if case.classifier else None
    unet, clf = fast_.prepare_models(unet, clf, device=torch.device("cpu"), dtype="float32", fused_kernels=True)
    kind = {"ddpm-guided": ("ddpm", 1.0), "ddim": ("ddim", 0.0)}.get(case.kind)
    if kind is None:
        raise SystemExit(f"--step: {case.name} is not a sampling case")
    settings = api.SamplerSettings(kind[0], respacing=f"ddim{steps}" if kind[0] == "ddim" else str(steps),
                                   guidance=kind[1])
    labels = [k % 1000 for k in range(batch)]

    def run():
        api.sample_batch(unet, list(range(batch)), seed=0, settings=settings, labels=labels, classifier=clf)

    return run, fused_, (unet, clf)


def step_host_time(case_name: str, batch: int | None, steps: int, repeats: int,
                   against: str | None = None) -> dict[str, float]:
    import bench  # noqa: E402 - benchmarks/ is this script's folder

    case = bench.CASES[case_name]
    batch = batch or case.batch
    builds = {"this tree": _step_runner("adm_cli", case, batch, steps)}
    if against:
        builds[against] = _step_runner(_package(against), case, batch, steps)
    calls = {"launch": 0, "conv": 0, "linear": 0, "attention": 0, "stats read": 0}
    saved = ([b[1]._launch for b in builds.values()], F.conv2d, F.linear, torch.Tensor.addmm_,
             torch.Tensor.__matmul__, F.scaled_dot_product_attention, F.conv_transpose2d)

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    def stub(name, grid, *args, **meta):  # (counts what the statistics kernel would read)
        if name == "stats":
            calls["stats read"] += args[0].numel() + (args[1].numel() if meta["TWO"] else 0)

    # the decisions of a half-precision GPU run (the older packages' name for it too)
    gemm = [(fused_, name, getattr(fused_, name)) for _, fused_, _ in builds.values()
            for name in ("gemm_runs", "skip_add_runs") if hasattr(fused_, name)]
    for fused_, name, _ in gemm:
        setattr(fused_, name, lambda t: True)
    for _, fused_, _ in builds.values():
        fused_._launch = count("launch", stub)
    F.conv2d, F.linear = count("conv", _fake_conv2d), count("linear", _fake_linear)
    F.conv_transpose2d = count("conv", _fake_conv_transpose2d)
    torch.Tensor.addmm_ = count("linear", lambda self, *a, **k: self)  # fused.conv1x1_cat's second GEMM
    torch.Tensor.__matmul__ = count("linear", _fake_matmul)
    F.scaled_dot_product_attention = count("attention", _fake_attention)
    try:
        per_step, times = {}, {name: [] for name in builds}
        for name, (run, _, _) in builds.items():
            run()
            calls.update(dict.fromkeys(calls, 0))
            run()
            per_step[name] = {k: v / steps for k, v in calls.items()}
        for _ in range(repeats):  # the builds alternate, so that the machine's drift hits both alike
            for name, (run, _, _) in builds.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / steps * 1e3)
    finally:
        for (_, fused_, _), launch in zip(builds.values(), saved[0]):
            fused_._launch = launch
        for fused_, name, real in gemm:
            setattr(fused_, name, real)
        (F.conv2d, F.linear, torch.Tensor.addmm_, torch.Tensor.__matmul__, F.scaled_dot_product_attention,
         F.conv_transpose2d) = saved[1:]
    from adm_cli.layers import GroupNorm32, ResBlock

    def count_of(kind, *models):
        return sum(isinstance(m, kind) for model in models if model is not None for m in model.modules())

    unet, clf = builds["this tree"][2]
    ours, mine = times["this tree"], per_step["this tree"]
    row = {"host ms per step": min(ours), "median": statistics.median(ours),
           **{f"{k} calls per step": v for k, v in mine.items() if k != "stats read"},
           "statistics elements read per step": mine["stats read"],
           "norms": count_of(GroupNorm32, unet, clf), "classifier norms": count_of(GroupNorm32, clf),
           "residual blocks": count_of(ResBlock, unet, clf)}
    for name, t in times.items():
        n = per_step[name]
        print(f"{case_name}, batch {batch}, {name}: {min(t):.1f} ms host per step, best of {repeats} runs "
              f"(median {statistics.median(t):.1f}, max {max(t):.1f}); per step {n['launch']:.0f} Triton launches, "
              f"{n['conv']:.0f} convolutions, {n['linear']:.0f} GEMMs, {n['attention']:.0f} attention calls; "
              f"the statistics kernel reads {n['stats read'] / 1e6:.3g}M elements", flush=True)
    if against:
        ratios = [a / b for a, b in zip(times[against], ours)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        row["against / this tree"] = statistics.median(ratios)
        print(f"host time, {against} / this tree, per alternating pair: median {row['against / this tree']:.3f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {len(ratios)} pairs)", flush=True)
    return row


if __name__ == "__main__":
    main()
