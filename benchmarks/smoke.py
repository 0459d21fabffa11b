"""First check of a GPU session: is the fused half-precision path right with this machine's Triton?

    python benchmarks/smoke.py --out SETS_FILE

The tests' tiny U-Nets (both block orders, the upsampler's 6-channel input) and the tiny
classifier's input gradient go through ``fast.prepare`` with the Triton kernels, against the
float32 exact path. If this build's defaults raise or miss the tests' bound, the newer parts are
switched back one at a time, newest first, until they pass. Prints, and writes to ``--out``, the
``--set`` flags that bench.py and accuracy.py should then take (an empty line when the defaults
pass), so that a kernel which only the GPU's compiler or hardware rejects costs a session its
part's numbers, not all of them. Exit 1 when nothing passes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (also puts src/ and tests/ on the path)

from adm_cli import fast, layers  # noqa: E402
from adm_cli.guidance import classifier_grad  # noqa: E402
from test_fast import OUTPUT_BOUNDS, TINY, TINY_CLF, exact, inputs, rel_norm  # noqa: E402

# Switched back in this order (newest part first), each on top of the ones before it.
FALLBACK = ("DIRECT_IN=off", "IN_STATS=off", "RESIDUAL_STATS=off", "SKIP_STATS=off", "SHARED_STATS=off", "FUSED_SKIP=off",
            "UP_CONV=plain", "PAD_IO=off")
FAMILIES = ("new-order", "legacy-order", "upsampler")
CLASSIFIER = True  # also the tiny classifier's input gradient (autograd through the kernels)
GRAD_BOUND = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


def _failure(what: str, e: Exception) -> str:
    return f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check(device: str, dtype: str) -> list[str]:
    """What is wrong with the fused path under the current switches (empty: nothing)."""
    problems = []
    for family in FAMILIES:
        cfg = TINY[family]
        ref = exact(cfg)
        x, t, kw = inputs(cfg)
        try:
            ours = fast.prepare(copy.deepcopy(ref), device=device, dtype=dtype, fused_kernels=True)
            with torch.no_grad():
                want = ref(x, t, **kw)
                got = ours(x.to(device), t.to(device), **{k: v.to(device) for k, v in kw.items()}).float().cpu()
            err = rel_norm(want, got)
        except Exception as e:  # noqa: BLE001  (a kernel the compiler or the GPU rejects)
            problems.append(_failure(family, e))
            traceback.print_exc(limit=3)
            continue
        if not err <= OUTPUT_BOUNDS[dtype]:  # (a NaN fails too)
            problems.append(f"{family}: relative error {err:.2e} > {OUTPUT_BOUNDS[dtype]:.0e}")
    if not CLASSIFIER:
        return problems
    ref = exact(TINY_CLF, seed=3)
    x, t, _ = inputs(TINY_CLF)
    y = torch.tensor([0, 3, 7])
    try:
        ours = fast.prepare(copy.deepcopy(ref), device=device, dtype=dtype, fused_kernels=True)
        err = rel_norm(classifier_grad(ref, x, t, y, 2.0),
                       classifier_grad(ours, x.to(device), t.to(device), y.to(device), 2.0).float().cpu())
        if not err <= GRAD_BOUND[dtype]:
            problems.append(f"classifier gradient: relative error {err:.2e} > {GRAD_BOUND[dtype]:.0e}")
    except Exception as e:  # noqa: BLE001
        problems.append(_failure("classifier gradient", e))
    return problems


def find_sets(device: str, dtype: str) -> list[str] | None:
    """The shortest prefix of FALLBACK under which ``check`` passes, less its items that change
    nothing (switches already in that state: neither tried nor returned); None if none passes.
    Leaves ``layers`` as it found it."""
    named = [(item, *item.split("=")) for item in FALLBACK]
    saved = {name: getattr(layers, name) for _, name, _ in named}
    steps = [item for item, name, value in named if saved[name] != bench.SWITCHES[name][value]]
    try:
        for n in range(len(steps) + 1):
            for name, value in saved.items():
                setattr(layers, name, value)
            bench.apply_switches(steps[:n])
            problems = check(device, dtype)
            print(f"switched back: {', '.join(steps[:n]) or 'nothing'}: "
                  + ("passes" if not problems else "; ".join(problems)), flush=True)
            if not problems:
                return steps[:n]
        return None
    finally:
        for name, value in saved.items():
            setattr(layers, name, value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (Triton's interpreter)")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--out", default=None, help="write the --set flags here")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sets = find_sets(device, dtype)
    flags = " ".join(f"--set {item}" for item in sets or [])
    print(f"flags for the later steps: {flags or '(none)'}" if sets is not None else "nothing passes")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(flags + "\n")
        os.replace(tmp, args.out)
    return 0 if sets is not None else 1


if __name__ == "__main__":
    sys.exit(main())
