"""How far the fast path is from float32: ours (``fast.prepare``) against the reference in float32.

    python benchmarks/accuracy.py                  # full-size 512 and 64 models on CUDA
    python benchmarks/accuracy.py --device cpu --small --dtypes bfloat16

For each model pair (random non-trivial weights, as in bench.py) and each half dtype:
- the U-Net output (eps and the variance channels) vs the reference's float32 output, as
  ||ours - ref|| / ||ref||;
- the classifier's input gradient of log p(y | x_t) vs the reference's float32 gradient;
- a short guided DDIM run (``--steps``) through the public API: uint8 images of the fast path vs
  our exact float32 path (which tests/test_sampling.py holds to the reference within 1e-4): the
  largest and mean difference in levels. Random networks do not denoise, so this is a harsher
  test than trained weights give.
On CUDA the float32 references run with TF32 off.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (also puts src/ and tests/ on the path)

from adm_cli import api, fast  # noqa: E402
from adm_cli.config import PRESETS  # noqa: E402
from adm_cli.guidance import classifier_grad  # noqa: E402
from adm_cli.models import set_exact_attention  # noqa: E402
from reference import reference_classifier, reference_unet  # noqa: E402

PAIRS = {"512": ("512x512_diffusion", "512x512_classifier", 2), "64": ("64x64_diffusion", "64x64_classifier", 8)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def check(name: str, args, device: torch.device) -> list[dict]:
    unet_name, clf_name, batch = PAIRS[name]
    ucfg, ccfg = PRESETS[unet_name], PRESETS[clf_name]
    if args.small:
        case = bench.CASES["ddpm-512-guided" if name == "512" else "ddpm-64-guided"]
        ucfg, ccfg, batch = ucfg.replace(**case.small), ccfg.replace(**case.small_clf), 2
    ours_u, ref_u = bench.build_pair(ucfg, reference_unet, 0, device)
    ours_c, ref_c = bench.build_pair(ccfg, reference_classifier, 1, device)
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(batch, 3, ucfg.image_size, ucfg.image_size, generator=g).to(device)
    y = torch.randint(0, ucfg.num_classes, (batch,), generator=g).to(device)
    t = torch.randint(0, ucfg.diffusion_steps, (batch,), generator=g).to(device)
    with torch.no_grad():
        want_out = ref_u(x, t, y=y)
    want_grad = grad_of(ref_c, x, t, y)
    exact_u = set_exact_attention(copy.deepcopy(ours_u), True)
    exact_c = set_exact_attention(copy.deepcopy(ours_c), True)
    del ref_u, ref_c
    rows = []
    settings = api.SamplerSettings("ddim", respacing=f"ddim{args.steps}", guidance=1.0)
    run = dict(num_samples=batch, seed=3, classes=y.tolist(), settings=settings, batch_size=batch)
    want_img = api.generate(exact_u, classifier=exact_c, **run).images.astype(int)
    for dtype in args.dtypes.split(","):
        fu, fc = fast.prepare_models(copy.deepcopy(ours_u), copy.deepcopy(ours_c), device=device, dtype=dtype)
        with torch.no_grad():
            out = fu(x, t, y=y)
        diff = np.abs(api.generate(fu, classifier=fc, **run).images.astype(int) - want_img)
        row = {"model": unet_name if not args.small else unet_name + " (small)", "dtype": dtype, "batch": batch,
               "eps_rel": rel(out[:, :3], want_out[:, :3]), "var_rel": rel(out[:, 3:], want_out[:, 3:]),
               "clf_grad_rel": rel(grad_of(fc, x, t, y), want_grad),
               "ddim_steps": args.steps, "uint8_max": int(diff.max()), "uint8_mean": float(diff.mean()),
               "uint8_p99": float(np.percentile(diff, 99))}
        print(row, flush=True)
        rows.append(row)
        del fu, fc
    return rows


def grad_of(clf, x, t, y) -> torch.Tensor:
    return classifier_grad(clf, x.float(), t, y, 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--models", default="512,64", help="from: 512, 64")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--steps", type=int, default=10, help="guided DDIM steps of the image check")
    p.add_argument("--small", action="store_true", help="the shrunk networks of bench.py --cpu-small")
    p.add_argument("--json", default=None)
    p.add_argument("--gn-upcast", action="store_true", help="GroupNorm through a float32 copy (as bench.py)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="as bench.py --set")
    args = p.parse_args(argv)
    try:
        bench.apply_switches(args.set)
    except ValueError as e:
        p.error(str(e))
    if args.gn_upcast:
        from adm_cli import layers
        layers.NATIVE_HALF_GROUPNORM = False
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.models.split(","):
        rows += check(name, args, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    print("| model | dtype | batch | eps rel err | variance rel err | classifier grad rel err | "
          "uint8 max / p99 / mean after guided DDIM |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['eps_rel']:.2e} | {r['var_rel']:.2e} | "
              f"{r['clf_grad_rel']:.2e} | {r['uint8_max']} / {r['uint8_p99']:.0f} / {r['uint8_mean']:.3f} "
              f"({r['ddim_steps']} steps) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
