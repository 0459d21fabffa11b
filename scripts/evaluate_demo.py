#!/usr/bin/env python
"""Print the demo models' measured sample quality as a markdown table.

    python scripts/evaluate_demo.py                          # the standard table (~30 min, 1 CPU thread)
    python scripts/evaluate_demo.py --per-class 10           # a quick look (~6 min)
    python scripts/evaluate_demo.py --setting demo-digits:ddim:10:0 --setting demo-digits-uncond:ddim:25:4
    python scripts/evaluate_demo.py --setting demo-digits:ddim:15:0:15      # DDIM on the "15" respacing
    python scripts/evaluate_demo.py --json results.json --device cuda

A setting is MODEL:SAMPLER:STEPS:GUIDANCE[:RESPACING] (RESPACING, any string the reference
accepts, replaces the sampler's default spacing of STEPS); MODEL is demo-digits (class-conditional) or
demo-digits-uncond (guided by demo-digits-classifier when GUIDANCE > 0); SAMPLER is any name in
adm_cli.samplers.SAMPLERS. Each setting samples PER_CLASS images of every class (requested
labels 0..9 in turn, seed SEED, per-sample seeds as `adm sample` uses them) and reports:

- acc: the fraction the evaluation classifier (trained on clean held-in images only, never used
  for guidance) assigns to the requested class (chance = 0.10);
- FD: the Frechet distance between its penultimate features of the samples and of the 359
  held-out real digits (lower is better; the "real" row is the floor: held-in real digits, the
  same count, against the same held-out set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adm_cli.api import SamplerSettings, to_uint8
from adm_cli.evaluation import (DEMO_FILES, EvalResult, demo_path, eval_outputs, evaluate_setting,
                                frechet_distance, gaussian_stats, load_digits, load_eval_classifier, real_stats)
from adm_cli.weights import load_model

STANDARD = [
    "demo-digits:ddpm:250:0", "demo-digits:ddpm:25:0", "demo-digits:ddim:25:0",
    "demo-digits-uncond:ddim:25:0",
    "demo-digits-uncond:ddim:25:1", "demo-digits-uncond:ddim:25:2", "demo-digits-uncond:ddim:25:4",
    "demo-digits-uncond:ddim:25:8",
]


def parse_setting(text: str) -> tuple[str, SamplerSettings]:
    try:
        model, sampler, steps, guidance, *respacing = text.split(":")
        if len(respacing) > 1:
            raise ValueError
        if respacing:  # the spacing alone decides the steps (STEPS is only shown)
            int(steps)
            return model, SamplerSettings(sampler=sampler, respacing=respacing[0], guidance=float(guidance))
        return model, SamplerSettings(sampler=sampler, steps=int(steps), guidance=float(guidance))
    except ValueError:
        raise SystemExit(f"bad --setting {text!r}: expected MODEL:SAMPLER:STEPS:GUIDANCE[:RESPACING]") from None


def real_row(net, per_class: int, reference, seed: int = 0) -> EvalResult:
    """Held-in real digits, per_class of each class drawn at random (``seed``), measured like
    samples (the floor). Random, not the first ones of each class: scikit-learn's order is not
    random, and its first 50 per class score FD 57.6 where random draws score 26-35."""
    x, y = load_digits("train")
    rng = np.random.default_rng(seed)
    keep = np.concatenate([np.sort(rng.choice(np.flatnonzero(y == c), per_class, replace=False)) for c in range(10)])
    start = time.perf_counter()
    feats, pred = eval_outputs(net, to_uint8(x[keep]))
    return EvalResult("real held-in digits", len(keep), float(np.mean(pred == y[keep])),
                      frechet_distance(gaussian_stats(feats), reference), time.perf_counter() - start,
                      tuple(int(c) for c in np.bincount(pred, minlength=10)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", action="append", help="MODEL:SAMPLER:STEPS:GUIDANCE (repeatable; default: the standard table)")
    p.add_argument("--per-class", type=int, default=50, help="samples per class (default 50: 500 per setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--demo-dir", type=Path, default=None, help="read the four demo files from here instead")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def path(name: str) -> Path:
        return args.demo_dir / DEMO_FILES[name] if args.demo_dir else demo_path(name)

    net = load_eval_classifier(path("demo-digits-eval"), args.device)
    x_test, y_test = load_digits("test")
    _, pred = eval_outputs(net, to_uint8(x_test))
    heldout = float(np.mean(pred == y_test))
    reference = real_stats(net, "test")
    print(f"evaluation classifier: held-out accuracy {heldout:.4f} on {len(y_test)} test digits", flush=True)

    models: dict[str, torch.nn.Module] = {}
    rows = [real_row(net, args.per_class, reference, args.seed)]
    print(_header(), flush=True)
    print(_line(rows[0], "-", "-", "-", "-"), flush=True)
    for text in args.setting or STANDARD:
        name, settings = parse_setting(text)
        for needed in (name, "demo-digits-classifier") if settings.guidance > 0 else (name,):
            if needed not in models:
                models[needed] = load_model(path(needed), device=args.device)
        clf = models.get("demo-digits-classifier") if settings.guidance > 0 else None
        row = evaluate_setting(text, models[name], settings, net, reference, per_class=args.per_class,
                               seed=args.seed, classifier=clf, batch_size=args.batch_size)
        rows.append(row)
        steps = settings.steps if settings.respacing is None else f"{text.split(':')[2]} ({settings.respacing!r})"
        print(_line(row, name, settings.sampler, steps, settings.guidance), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"heldout_accuracy": heldout, "rows": [r.__dict__ for r in rows]}, indent=1))
    return 0


def _header() -> str:
    return ("| model | sampler | steps | guidance | N | class acc | FD | seconds | predicted class counts |\n"
            "|---|---|---|---|---|---|---|---|---|")


def _line(row: EvalResult, model, sampler, steps, guidance) -> str:
    model = row.name if model == "-" else model
    return (f"| {model} | {sampler} | {steps} | {guidance} | {row.num_samples} | {row.accuracy:.3f} | "
            f"{row.frechet:.2f} | {row.seconds:.0f} | {' '.join(map(str, row.class_counts))} |")


if __name__ == "__main__":
    sys.exit(main())
