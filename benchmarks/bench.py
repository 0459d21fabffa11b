"""adm-cli against OpenAI's reference (guided-diffusion-sdk), side by side, one process, one device.

    python benchmarks/bench.py                      # GPU cases (or the small CPU cases without CUDA)
    python benchmarks/bench.py --cpu-small          # seconds, on any machine (CI)
    python benchmarks/bench.py --device cpu --cases ddim-64,fwd-64 --batch 4 --repeats 5
    python benchmarks/bench.py --compile --json out.json

Each case builds both networks with the same random weights (never zeros: zero-initialised output
convs hide work). Ours goes through ``fast.prepare`` (fp16 U-Net / bf16 classifier + channels_last +
fused GroupNorm kernels + SDPA on GPU, float32 + channels_last + SDPA on CPU) and the public ``api.sample_batch``; the reference runs its own
sampling loop (``p_sample_loop`` / ``ddim_sample_loop`` of a ``SpacedDiffusion``) with its fp16
mode on GPU (``convert_to_fp16`` + ``dtype = float16``, as ``use_fp16`` sets it) and float32 on CPU.
A "step" is one respaced step: a run of ``--steps`` steps, divided. Ours and the reference
alternate within every repeat; the table gives medians. FLOPs are the reference's, counted once
per case with FlopCounterMode (1 multiply-add = 2 FLOPs), so both sides get credit for the same
work. Peak memory: CUDA max_memory_allocated during the step minus what was allocated before,
plus the side's own weights (what a process running only that side would hold), plus with
``--cuda-graph`` what the captures' memory pool holds; n/a on CPU.

``--variant NAME=ARGS`` (repeatable) also times ours in another setting of the fused path's
switches and tunables, in turn with the rest in every repeat, as a row "CASE [NAME]" against the
same reference timings: an A/B without the run-to-run spread of separate processes. Its graphs
are its own, in the same capture pool (so each graphed row's peak counts every setting's captures).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")]

from adm_cli import api, fast, graphs  # noqa: E402
from adm_cli.config import PRESETS  # noqa: E402
from adm_cli.models import build_model  # noqa: E402

import tunables  # noqa: E402  (benchmarks/)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from reference import reference_classifier, reference_diffusion, reference_unet  # noqa: E402

# Dense bf16/fp16 matrix rate in TFLOP/s, by a substring of the device name: ~790 for the H200
# as performance.md and the issue give it; the H100 (SXM) has the same tensor cores and clocks
# (both datasheets say 989 dense, which performance.md does not use). Others: datasheet dense
# figures. A device not listed prints "n/a".
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "ddpm-guided", "ddim" or "forward"
    unet: str
    classifier: str | None
    batch: int
    small: dict = field(default_factory=dict)  # config changes for --cpu-small
    small_clf: dict = field(default_factory=dict)
    small_batch: int = 2


# --cpu-small: every case shrunk to 16x16 images and 1-2 narrow levels (seconds on a CPU).
_SMALL = dict(num_res_blocks=1, image_size=16, attention_resolutions="8", num_head_channels=32)
_S64 = dict(_SMALL, num_channels=32, channel_mult="1,2")
_C64 = dict(image_size=16, classifier_width=32, classifier_depth=1, channel_mult="1,2",
            classifier_attention_resolutions="8", num_head_channels=32)
CASES = {c.name: c for c in [
    Case("ddpm-512-guided", "ddpm-guided", "512x512_diffusion", "512x512_classifier", 8,
         dict(_SMALL, num_channels=64, channel_mult="0.5,1"), dict(_C64, classifier_width=64, channel_mult="0.5,1"), 2),
    Case("ddpm-64-guided", "ddpm-guided", "64x64_diffusion", "64x64_classifier", 64, _S64, _C64, 2),
    Case("ddim-256", "ddim", "256x256_diffusion", None, 16, _S64, {}, 2),
    Case("ddim-64", "ddim", "64x64_diffusion", None, 64, _S64, {}, 2),
    Case("fwd-64", "forward", "64x64_diffusion", None, 64, _S64, {}, 2),
]}
DEFAULT_CASES = ["ddpm-512-guided", "ddpm-64-guided", "ddim-256"]


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights: N(0, 1/fan_in) matrices, norms near 1, small biases (drawn on the
    module's device: building a 560M-parameter network on the CPU would eat GPU-session time)."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g, device=device)
            if p.dim() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.05 * noise)
    return module


def build_pair(cfg, ref_builder, seed: int, device: torch.device):
    """(ours, reference) with identical weights, both on ``device`` in float32."""
    with torch.device(device):
        ref = randomize(ref_builder(cfg), seed).eval()
        ours = build_model(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


class Side:
    """One side of a case: a zero-argument step function, its weights and its timings."""

    def __init__(self, run, modules, steps: int, graphed: bool = False):
        self.run, self.modules, self.steps, self.graphed = run, modules, steps, graphed
        self.times: list[float] = []
        self.peak: int | None = None

    def timed(self, device: torch.device) -> None:
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        self.run()
        sync(device)
        self.times.append((time.perf_counter() - start) / self.steps)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before + weight_bytes(*self.modules)
            if self.graphed:  # replays run in the captures' pool, which the allocator's counters miss
                peak += graphs.pool_bytes(device)
            self.peak = max(self.peak or 0, peak)


def make_case(case: Case, args, device: torch.device):
    small = args.cpu_small
    cfg = PRESETS[case.unet].replace(**case.small) if small else PRESETS[case.unet]
    batch = args.batch or (case.small_batch if small else case.batch)
    ours_u, ref_u = build_pair(cfg, reference_unet, 0, device)
    ours_c = ref_c = None
    if case.classifier:
        ccfg = PRESETS[case.classifier].replace(**case.small_clf) if small else PRESETS[case.classifier]
        ours_c, ref_c = build_pair(ccfg, reference_classifier, 1, device)
    how = (args.compile_mode or True) if args.compile else False
    layout = {"auto": None, "on": True, "off": False}[args.channels_last]
    fused_kernels = {"auto": None, "on": True, "off": False}[args.fused]
    ours_u, ours_c = fast.prepare_models(ours_u, ours_c, device=device, dtype=args.dtype, compile=how,
                                         channels_last=layout, fused_kernels=fused_kernels)
    if device.type == "cuda":  # the reference's own half-precision mode (what use_fp16 does)
        for m in (ref_u, ref_c):
            if m is not None:
                m.convert_to_fp16()
                m.dtype = torch.float16
    g = torch.Generator(device="cpu").manual_seed(5)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    x_t = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    steps = args.steps
    kw = {"y": y} if cfg.class_cond else {}
    t_mid = torch.full((batch,), cfg.diffusion_steps // 2, device=device)

    if case.kind == "forward":
        def ours_run():
            with torch.inference_mode():
                ours_u(x_t, t_mid, **kw)

        def ref_run():
            with torch.inference_mode():
                ref_u(x_t, t_mid, **kw)

        def count():
            with torch.no_grad():
                ref_u(x_t, t_mid, **kw)
        return cfg, batch, Side(ours_run, [ours_u], 1), Side(ref_run, [ref_u], 1), count

    guided = case.kind == "ddpm-guided"
    assert cfg.class_cond or not guided, "the reference's cond_fn reads y from the model kwargs"
    sampler = "ddpm" if case.kind.startswith("ddpm") else "ddim"
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    settings = api.SamplerSettings(sampler, respacing=respacing, guidance=1.0 if guided else 0.0)
    labels = y.cpu().numpy()

    def ours_run():
        api.sample_batch(ours_u, list(range(batch)), seed=0, settings=settings, labels=labels,
                         classifier=ours_c, cuda_graph=args.cuda_graph)

    diffusion = reference_diffusion(cfg, respacing)

    counting = []  # non-empty while FlopCounterMode runs

    def cond_fn(x, t, y=None):  # OpenAI's classifier_sample.py, verbatim in effect
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(ref_c(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            if counting:  # FlopCounterMode's module hooks reject autograd.grad; same input-only work
                selected.sum().backward(inputs=[x_in])
                return x_in.grad * 1.0
            return torch.autograd.grad(selected.sum(), x_in)[0] * 1.0

    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop

    def ref_run():
        with torch.no_grad():
            loop(ref_u, tuple(x_t.shape), noise=x_t.clone(), clip_denoised=True,
                         model_kwargs=kw,
                         cond_fn=cond_fn if guided else None, device=device, progress=False)

    def count():
        counting.append(True)
        try:
            ref_run()
        finally:
            counting.clear()

    return cfg, batch, Side(ours_run, [ours_u, ours_c], steps, args.cuda_graph), Side(ref_run, [ref_u, ref_c], steps), count


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def device_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run_case(case: Case, args, device: torch.device) -> list[dict]:
    """The case's row, and one per ``--variant`` (ours in that setting, timed in turn with the
    others in the same repeats, against the same reference timings)."""
    cfg, batch, ours, ref, count = make_case(case, args, device)
    start = time.perf_counter()
    ours.run()  # warm-up (with --compile: the compilation)
    sync(device)
    warm_s = time.perf_counter() - start
    variants = []
    for v in args.variants:
        side = Side(v.wrap(ours.run, ours.modules), ours.modules, ours.steps, ours.graphed)
        side.run()  # its warm-up: its kernels' compiles, its captures
        variants.append((v, side))
    ref.run()
    # FLOPs of one reference step: a full timed run counted, divided by its steps.
    flops = count_flops(count) / ref.steps if not args.no_flops else float("nan")
    print(f"{case.name}: warm-up {warm_s:.1f} s, {flops / 1e9:.4g} GFLOP/step", file=sys.stderr, flush=True)
    sides = [ours, *(side for _, side in variants), ref]
    for r in range(args.repeats):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotate who goes first
            side.timed(device)
        print(f"  repeat {r}: ours {ours.times[-1] * 1e3:.1f} ms, "
              + "".join(f"{v.name} {side.times[-1] * 1e3:.1f} ms, " for v, side in variants)
              + f"ref {ref.times[-1] * 1e3:.1f} ms per step", file=sys.stderr, flush=True)
    if args.profile:
        profile(ours, device, f"{args.profile}.{case.name}.txt")
    name, peak = device_peak(device)
    row = {"case": case.name, "device": name, "image_size": cfg.image_size, "batch": batch,
           "repeats": args.repeats, "steps_timed": ours.steps, "ours_warmup_s": round(warm_s, 2),
           "gflop_per_step": flops / 1e9}
    rows = []
    for variant, mine in [(None, ours), *variants]:
        r = dict(row, case=case.name + ("" if variant is None else f" [{variant.name}]"))
        if variant is not None:
            r["variant"] = variant.desc
        for label, side in (("ours", mine), ("ref", ref)):
            ms = statistics.median(side.times) * 1e3
            tflops = flops / (ms * 1e-3) / 1e12
            r.update({f"{label}_ms": ms, f"{label}_ms_all": [t * 1e3 for t in side.times],
                      f"{label}_img_s_250": batch / (ms * 1e-3 * 250) if case.kind != "forward" else None,
                      f"{label}_peak_mib": None if side.peak is None else side.peak / 2 ** 20,
                      f"{label}_tflops": tflops, f"{label}_peak_frac": None if peak is None else tflops / peak})
        r["speedup"] = r["ref_ms"] / r["ours_ms"]
        rows.append(r)
    return rows


def profile(side: Side, device: torch.device, path: str) -> None:
    """Where one timed run of ``side`` spends its time, by operator (torch.profiler), to a file."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch_profile(activities=activities) as prof:
        side.run()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60))


def fmt(v, spec: str) -> str:
    return "n/a" if v is None or v != v else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("case", "batch", "ours ms", "ref ms", "speedup", "ours img/s@250", "ref img/s@250",
            "ours peak MiB", "ref peak MiB", "GFLOP/step", "ours TFLOP/s (%peak)", "ref TFLOP/s (%peak)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def tf(side):
            frac = r[f"{side}_peak_frac"]
            return f"{fmt(r[f'{side}_tflops'], '.3g')} ({fmt(None if frac is None else 100 * frac, '.1f')}%)"
        cells = (r["case"], str(r["batch"]), fmt(r["ours_ms"], ".1f"), fmt(r["ref_ms"], ".1f"),
                 fmt(r["speedup"], ".2f") + "x", fmt(r["ours_img_s_250"], ".3g"), fmt(r["ref_img_s_250"], ".3g"),
                 fmt(r["ours_peak_mib"], ".0f"), fmt(r["ref_peak_mib"], ".0f"), fmt(r["gflop_per_step"], ".4g"),
                 tf("ours"), tf("ref"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SWITCHES = {"FUSED_SKIP": {"on": True, "off": False}, "PAD_IO": {"on": True, "off": False},
            "UP_CONV": {"transposed": "transposed", "plain": "plain"}, "SHARED_STATS": {"on": True, "off": False},
            "SKIP_STATS": {"on": True, "off": False}, "IN_STATS": {"on": True, "off": False},
            "RESIDUAL_STATS": {"on": True, "off": False},
            "DIRECT_IN": {"on": True, "off": False}, "CENTRED_GN": {"on": True, "off": False}}


def switch(item: str) -> tuple[str, object]:
    """(``layers`` attribute, value) of a ``NAME=VALUE`` item of ``--set``; ValueError if unknown."""
    name, _, value = item.partition("=")
    if name not in SWITCHES or value not in SWITCHES[name]:
        raise ValueError(f"--set {item}: choose " + "; ".join(f"{k}={'/'.join(v)}" for k, v in SWITCHES.items()))
    return name, SWITCHES[name][value]


def settings(sets: list[str], skip_gemm: str | None, add_stats: str | None,
             stats_loop: str | None = None) -> tuple[dict, dict]:
    """({``layers`` switch: value}, {``fused`` tunable: value}) from ``--set`` items, ``--skip-gemm``,
    ``--add-stats`` and ``--stats-loop``; ValueError (one line) if one is malformed."""
    specs = ((tunables.gemm, skip_gemm), (tunables.add_stats, add_stats), (tunables.stats_loop, stats_loop))
    return (dict(switch(item) for item in sets),
            {name: v for parse, spec in specs if spec for name, v in parse(spec).items()})


def apply_switches(items: list[str]) -> list[str]:
    """Set ``layers``' switches from ``NAME=VALUE`` items (``--set``); returns the items applied."""
    from adm_cli import layers

    for item in items:
        setattr(layers, *switch(item))
    return list(items)


class Variant:
    """Another setting of ours timed in the same run (``--variant NAME=ARGS``): ``layers``' switches
    and ``fused``'s tunables from ARGS (``--set``, ``--skip-gemm``, ``--add-stats``,
    ``--stats-loop``), set around each of its runs and restored after, with CUDA graphs of its own
    (the captures kept on the networks are swapped in and out: a graph replays the kernels it
    captured)."""

    def __init__(self, spec: str):
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest.strip():
            raise ValueError(f"--variant {spec!r}: want NAME=ARGS, e.g. 'picks=--skip-gemm 128:128:64:4:3:1'")
        p = argparse.ArgumentParser(prog=f"--variant {name}", add_help=False)
        p.add_argument("--set", action="append", default=[])
        p.add_argument("--skip-gemm", default=None)
        p.add_argument("--add-stats", default=None)
        p.add_argument("--stats-loop", default=None)
        try:
            a, extra = p.parse_known_args(rest.split())
        except SystemExit:
            extra = [rest]
        if extra:
            raise ValueError(f"--variant {spec!r}: want only --set, --skip-gemm, --add-stats and --stats-loop "
                             "in ARGS")
        self.name, self.desc = name, rest.strip()
        self.layers, self.fused = settings(a.set, a.skip_gemm, a.add_stats, a.stats_loop)
        self.captures: dict[int, object] = {}

    def wrap(self, run, modules):
        """``run`` with this variant's settings and graphs, everything restored after."""
        from adm_cli import layers

        def run_variant():
            mods = [m for m in modules if m is not None]
            saved_caps = [m.__dict__.pop("_adm_captures", None) for m in mods]
            for m in mods:
                if id(m) in self.captures:
                    object.__setattr__(m, "_adm_captures", self.captures[id(m)])
            try:
                with tunables.tuned(self.layers, layers), tunables.tuned(self.fused):
                    run()
            finally:
                for m, caps in zip(mods, saved_caps):
                    mine = m.__dict__.pop("_adm_captures", None)
                    if mine is not None:
                        self.captures[id(m)] = mine
                    if caps is not None:
                        object.__setattr__(m, "_adm_captures", caps)
        return run_variant


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--cases", default=None, help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--cpu-small", action="store_true", help="shrunk networks and batches (automatic without CUDA)")
    p.add_argument("--full", action="store_true", help="full-size networks even on CPU")
    p.add_argument("--batch", type=int, default=None, help="override every case's batch")
    p.add_argument("--steps", type=int, default=2, help="sampler steps per timed run (>= 2: the reference "
                   "cannot build a 1-step schedule)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto", help="ours: auto, float32, bfloat16, float16")
    p.add_argument("--compile", action="store_true", help="ours with torch.compile (warm-up reported)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile (e.g. max-autotune)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="ours: activation layout (auto: fast.prepare's choice for the device)")
    p.add_argument("--cuda-graph", action="store_true", help="ours: replay each step's network calls as CUDA "
                   "graphs (graphs.py; captured during the warm-up run)")
    p.add_argument("--fused", default="auto", choices=["auto", "on", "off"],
                   help="ours: the fused Triton GroupNorm kernels (auto: on for eager CUDA when Triton is there)")
    p.add_argument("--gn-upcast", action="store_true", help="ours: GroupNorm through an explicit float32 "
                   "copy, as the reference does (default on CUDA: the native half-precision kernel)")
    p.add_argument("--concat", action="store_true", help="ours, fused: the decoder blocks concatenate h and "
                   "the skip (torch.cat) as before, instead of reading both in place")
    p.add_argument("--profile", default=None, metavar="PREFIX", help="also profile one run of ours per case "
                   "(torch.profiler) into PREFIX.<case>.txt")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="ours, fused: one of adm_cli.layers' switches (FUSED_SKIP, UP_CONV, PAD_IO, SHARED_STATS, "
                        "SKIP_STATS, IN_STATS, RESIDUAL_STATS, DIRECT_IN; "
                        "on/off or, for UP_CONV, transposed/plain), to time a part against its plainer form")
    p.add_argument("--add-stats", default=None, metavar="ROWS:TILE:WARPS", help="ours, fused: the residual "
                   "add's statistics geometry (with --set RESIDUAL_STATS=on; ops.py --groups addnorm times them)")
    p.add_argument("--skip-gemm", default=None, metavar="M:N:K:W:S[:L]", help="ours, fused: skip_add's tiles, "
                   "warps, stages and (L=1) one K loop over the decoder's two inputs (ops.py --groups skip times them)")
    p.add_argument("--stats-loop", default=None, metavar="STAGES:PPS", help="ours, fused: the reductions' "
                   "row loops, pipeline stages (1: plain) and programs per multiprocessor (ops.py --groups stats "
                   "times them)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="ours, fused: also time ours with ARGS (--set, --skip-gemm, --add-stats, --stats-loop; "
                        "quoted, on top of this run's own) in the same process, in turn with the rest, as a row "
                        "'CASE [NAME]'")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type != "cuda" and not args.full:
        args.cpu_small = True
    names = args.cases.split(",") if args.cases else DEFAULT_CASES
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.gn_upcast:
        from adm_cli import layers
        layers.NATIVE_HALF_GROUPNORM = False
    if args.concat:
        from adm_cli import layers
        layers.FUSED_CONCAT = False
    try:
        from adm_cli import layers

        switches, tuned = settings(args.set, args.skip_gemm, args.add_stats, args.stats_loop)
        tunables.apply(switches, layers)
        tunables.apply(tuned)
        switched = list(args.set) + [f"{flag} {v}" for flag, v in (("add-stats", args.add_stats),
                                                                      ("skip-gemm", args.skip_gemm),
                                                                      ("stats-loop", args.stats_loop)) if v]
        args.variants = [Variant(spec) for spec in args.variant]
        if len({v.name for v in args.variants}) < len(args.variants):
            raise ValueError("--variant: each NAME once")
    except ValueError as e:
        p.error(str(e))
    torch.manual_seed(0)
    dev, peak = device_peak(device)
    mode = "cpu-small" if args.cpu_small else "full"
    ours_desc = (f"{fast.resolve_dtype(args.dtype, device)}".replace("torch.", "")
                 + (f" + compile ({args.compile_mode or 'default'})" if args.compile else "")
                 + (" + GroupNorm upcast" if args.gn_upcast else "")
                 + (" + CUDA graphs" if args.cuda_graph else "")
                 + (" + torch.cat in the decoder" if args.concat else "")
                 + "".join(f" + {item}" for item in switched)
                 + (" + fused GroupNorm" if (args.fused == "on" or args.fused == "auto"
                                              and fast.use_fused_kernels(device, compile=args.compile)) else "")
                 + ("" if args.channels_last == "auto" else f", channels_last {args.channels_last}"))
    rows, failed = [], []
    for n in names:
        try:
            rows.extend(run_case(CASES[n], args, device))
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others' numbers
            failed.append(n)
            print(f"{n}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        gc.collect()  # free this case's four networks before the next case builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:  # after every case, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"device": dev, "peak_tflops": peak, "torch": torch.__version__, "mode": mode,
                           "ours": ours_desc, "compile": args.compile, "rows": rows, "failed": failed}, f,
                          indent=2)
    print(f"device: {dev} ({'peak ' + str(peak) + ' TFLOP/s bf16' if peak else 'peak unknown'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, mode {mode}, ours {ours_desc}, "
          f"reference {'fp16' if device.type == 'cuda' else 'float32'}; medians of {args.repeats}, "
          f"{args.steps} steps per timed run; speedup = ref ms / ours ms")
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
