#!/usr/bin/env python
"""Train the bundled demo models from a fixed seed, on a CPU.

    python scripts/train_demo.py                       # all stages -> src/adm_cli/demo/
    python scripts/train_demo.py --only eval           # one stage (each is seeded on its own)
    python scripts/train_demo.py --out /tmp/pilot --diffusion-steps 100   # a quick pilot

Stages and the files they write (weights stored as float16 to keep the wheel small;
``load_model`` casts them to float32):

- ``diffusion``: ``demo-digits`` and ``demo-digits-uncond``. One ADM U-Net trained on the
  loss E w_t ||eps - eps_theta(x_t, t, y)||^2 (Ho et al. 2020, eq. 14, with the min-SNR weight
  w_t below), x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t uniform on 0..T-1. With probability
  ``p_uncond`` the label is dropped, i.e. the class embedding is not added (Ho & Salimans 2022's
  joint training): the same weights are then an unconditional model eps_theta(x_t, t), which
  is exactly our UNet with class_cond=False (it has no ``label_emb``). One run, two models.
- ``classifier``: ``demo-digits-classifier``, ADM's noisy classifier p_phi(y | x_t, t) trained
  with cross-entropy on x_t at uniform t under the same schedule (Dhariwal & Nichol, sec. 4).
- ``eval``: ``demo-digits-eval``, the evaluation CNN (adm_cli.evaluation.EvalNet) trained on
  clean images only, with +-2 pixel shifts; never used for guidance.

The digits are grey, so the networks are too: one input/output channel (``in_channels=1``), and
``api.to_uint8`` replicates it to RGB. A 3-channel model of grey data must learn to keep its
channels equal; the first bundled version (3 channels, 1,000 steps) did not, and its samples
came out colour-cast by up to 184 levels.

On this project's 2-core CPU the defaults take about 55 minutes (diffusion ~1.1 s/step with 2
threads on an idle machine, then the classifier and the evaluation net). Only the training split of adm_cli.evaluation's fixed stratified split is used. All weights
are EMA averages (decay ramped as min(d, (1 + n) / (10 + n))). Same seed, thread count and
torch build give the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adm_cli.config import ClassifierConfig, UNetConfig
from adm_cli.evaluation import DEMO_DIR, EvalNet, class_accuracy, load_digits, save_eval_classifier
from adm_cli.layers import AttentionBlock, ResBlock
from adm_cli.models import Classifier, UNet
from adm_cli.schedule import Schedule
from adm_cli.weights import save_weights

# Cosine schedule: at 32x32 (and digits that are really 8x8) the linear schedule is almost
# pure noise for the last ~third of its steps; the cosine alpha_bar spends them usefully and
# degrades less when sampling is respaced to few steps (Nichol & Dhariwal 2021, sec. 3.2).
# Width 64 at 32x32, not 32: GroupNorm's 32 groups over 32 channels normalise every channel on
# its own, which removes each channel's spatial mean, so the output head cannot see the mean
# (DC) of x_t per colour channel. eps_theta then gets the DC of the noise wrong, x0 = (x_t -
# sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) amplifies that by up to 1 / sqrt(alpha_bar_t)
# at large t, and samples come out with strong colour casts. With 2 channels per group the
# head sees DC differences. Measured: x_t DC -> eps DC response 4% of ideal (width 32, 900
# steps) vs 45% (width 64, 150 steps).
UNET = UNetConfig(
    image_size=32, in_channels=1, num_channels=64, channel_mult="1,1,1", num_res_blocks=1,
    attention_resolutions="4", num_head_channels=32, class_cond=True, num_classes=10, noise_schedule="cosine", diffusion_steps=1000,
    learn_sigma=False, sigma_small=True, use_scale_shift_norm=True,
)
CLASSIFIER = ClassifierConfig(
    image_size=32, in_channels=1, classifier_width=32, classifier_depth=1, channel_mult="1,1,2",
    classifier_attention_resolutions="8", num_head_channels=32, num_classes=10,
    noise_schedule="cosine", diffusion_steps=1000,
)


class NullableEmbedding(nn.Embedding):
    """The class embedding, where label -1 means "no label" and contributes zero (CFG training)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        keep = (y >= 0).unsqueeze(-1)
        return super().forward(y.clamp(min=0)) * keep.to(self.weight.dtype)


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta, with d ramped up over the first steps."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v, 1 - d) if v.dtype.is_floating_point else self.shadow[k].copy_(v)


def zero_init(model: nn.Module) -> nn.Module:
    """Zero each residual branch's last layer (ADM's zero_module): every block starts as identity."""
    for m in model.modules():
        if isinstance(m, ResBlock):
            nn.init.zeros_(m.out_layers[-1].weight), nn.init.zeros_(m.out_layers[-1].bias)
        elif isinstance(m, AttentionBlock):
            nn.init.zeros_(m.proj_out.weight), nn.init.zeros_(m.proj_out.bias)
    if isinstance(model, UNet):
        nn.init.zeros_(model.out[-1].weight), nn.init.zeros_(model.out[-1].bias)
    return model


def lr_at(step: int, steps: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 0 (the EMA smooths the end of the run)."""
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def batches(n: int, batch: int, gen: torch.Generator):
    """Endless minibatch indices, a fresh permutation per epoch."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for b in range(0, n - batch + 1, batch):
            yield perm[b:b + batch]


def fit(name: str, model: nn.Module, loss_fn, *, n: int, steps: int, batch: int, lr: float, ema_decay: float,
        seed: int, log_every: int = 100) -> dict[str, torch.Tensor]:
    """AdamW over ``steps`` minibatches; returns the EMA weights. ``loss_fn(idx, gen) -> loss``."""
    gen = torch.Generator().manual_seed(seed)
    model.to(memory_format=torch.channels_last)  # oneDNN's faster conv layout on CPU; same numbers
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema, running, start = EMA(model, ema_decay), None, time.perf_counter()
    model.train()
    for step, idx in zip(range(steps), batches(n, batch, gen)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            spent = time.perf_counter() - start
            print(f"[{name}] step {step + 1}/{steps} loss {running:.4f} {spent / (step + 1):.2f} s/step "
                  f"eta {spent / (step + 1) * (steps - step - 1) / 60:.1f} min", flush=True)
    model.eval()
    return ema.shadow


def q_sample(x0: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. eq. 4)."""
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def publish(path: Path) -> None:
    """save_weights writes through mkstemp (mode 0600); package data must be world-readable."""
    path.chmod(0o644)


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.dtype.is_floating_point else v for k, v in state.items()}


def train_diffusion(args, x: torch.Tensor, y: torch.Tensor, out: Path) -> None:
    torch.manual_seed(args.seed)
    model = zero_init(UNet(UNET))
    old = model.label_emb
    model.label_emb = NullableEmbedding(old.num_embeddings, old.embedding_dim)
    model.label_emb.load_state_dict(old.state_dict())
    alpha_bar = torch.from_numpy(Schedule.create(UNET.noise_schedule, UNET.diffusion_steps).alphas_cumprod).float()

    def loss_fn(idx, gen):
        x0, labels = x[idx, :1], y[idx]  # grey: the three channels are equal
        t = torch.randint(0, UNET.diffusion_steps, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(len(idx), generator=gen) < args.p_uncond
        err = (model(q_sample(x0, t, alpha_bar, eps), t, torch.where(drop, -1, labels)) - eps).pow(2).mean((1, 2, 3))
        if args.min_snr > 0:
            # Min-SNR-gamma weighting (Hang et al. 2023) for eps: w_t = min(SNR_t, gamma) / SNR_t,
            # SNR_t = alpha_bar_t / (1 - alpha_bar_t): the large, nearly useless eps errors at small
            # t stop dominating the gradient; w_t = 1 wherever SNR_t <= gamma.
            snr = alpha_bar[t] / (1 - alpha_bar[t])
            err = err * snr.clamp(max=args.min_snr) / snr
        return err.mean()

    state = fit("diffusion", model, loss_fn, n=len(x), steps=args.diffusion_steps, batch=args.batch_size,
                lr=args.lr, ema_decay=args.ema, seed=args.seed)
    meta = {"adm_train": json.dumps({"seed": args.seed, "steps": args.diffusion_steps, "batch": args.batch_size,
                                     "lr": args.lr, "ema": args.ema, "p_uncond": args.p_uncond,
                                     "min_snr": args.min_snr}, sort_keys=True)}
    publish(save_weights(out / "demo-digits.safetensors", half(state), UNET,
                         {**meta, "adm_registry_name": "demo-digits"}, overwrite=True))
    uncond = {k: v for k, v in half(state).items() if not k.startswith("label_emb.")}
    publish(save_weights(out / "demo-digits-uncond.safetensors", uncond, UNET.replace(class_cond=False),
                         {**meta, "adm_registry_name": "demo-digits-uncond"}, overwrite=True))


def train_classifier(args, x: torch.Tensor, y: torch.Tensor, out: Path) -> None:
    torch.manual_seed(args.seed + 1)
    model = zero_init(Classifier(CLASSIFIER))
    alpha_bar = torch.from_numpy(Schedule.create(CLASSIFIER.noise_schedule, CLASSIFIER.diffusion_steps)
                                 .alphas_cumprod).float()

    def loss_fn(idx, gen):
        x0 = x[idx, :1]
        t = torch.randint(0, CLASSIFIER.diffusion_steps, (len(idx),), generator=gen)
        return F.cross_entropy(model(q_sample(x0, t, alpha_bar, torch.randn(x0.shape, generator=gen)), t), y[idx])

    state = fit("classifier", model, loss_fn, n=len(x), steps=args.classifier_steps, batch=args.batch_size,
                lr=args.classifier_lr, ema_decay=args.ema, seed=args.seed + 1)
    meta = {"adm_train": json.dumps({"seed": args.seed + 1, "steps": args.classifier_steps,
                                     "batch": args.batch_size, "lr": args.classifier_lr, "ema": args.ema}, sort_keys=True)}
    publish(save_weights(out / "demo-digits-classifier.safetensors", half(state), CLASSIFIER,
                         {**meta, "adm_registry_name": "demo-digits-classifier"}, overwrite=True))


def shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Translate each image by up to +-pixels, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_eval(args, x: torch.Tensor, y: torch.Tensor, out: Path) -> None:
    torch.manual_seed(args.seed + 2)
    net = EvalNet()

    def loss_fn(idx, gen):
        return F.cross_entropy(net(shift(x[idx], gen)), y[idx])

    state = fit("eval", net, loss_fn, n=len(x), steps=args.eval_steps, batch=128, lr=1e-3, ema_decay=args.ema,
                seed=args.seed + 2)
    net.load_state_dict(state)
    x_test, y_test = load_digits("test")
    acc = class_accuracy(net, x_test, y_test)
    print(f"[eval] held-out accuracy {acc:.4f} on {len(y_test)} test images", flush=True)
    meta = {"adm_registry_name": "demo-digits-eval", "adm_heldout_accuracy": f"{acc:.4f}",
            "adm_train": json.dumps({"seed": args.seed + 2, "steps": args.eval_steps}, sort_keys=True)}
    publish(save_eval_classifier(out / "demo-digits-eval.safetensors", net, meta))


STAGES = {"diffusion": train_diffusion, "classifier": train_classifier, "eval": train_eval}


def spawn(args, stages: list[str]) -> subprocess.Popen:
    """Run ``stages`` in a child process with the same options (one stage never spans two cores)."""
    cmd = [sys.executable, __file__, "--jobs", "1"] + [a for s in stages for a in ("--only", s)]
    for key, value in vars(args).items():
        if key not in ("only", "jobs"):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder (default: the package's demo/)")
    p.add_argument("--only", choices=sorted(STAGES), action="append", help="run only this stage (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads; the bundled files were made with 2 (results may depend on it)")
    p.add_argument("--jobs", type=int, default=1, help="processes: 2 trains the classifiers beside the diffusion model "
                   "(on 2 cores, 1 job x 2 threads finishes sooner)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--classifier-lr", type=float, default=1e-3)
    p.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weight (0: the simple loss)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.3, help="label-drop probability (joint training)")
    p.add_argument("--diffusion-steps", type=int, default=2500)
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--eval-steps", type=int, default=600)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = load_digits("train")
    y = torch.as_tensor(y)
    print(f"training on {len(x)} held-in digits ({x.shape[-1]}x{x.shape[-1]}), threads={args.threads}", flush=True)
    start = time.perf_counter()
    stages = args.only or list(STAGES)
    child = None
    if args.jobs > 1 and "diffusion" in stages and len(stages) > 1:
        # The diffusion stage is the long pole: the others run beside it on the second core.
        child = spawn(args, [s for s in stages if s != "diffusion"])
        stages = ["diffusion"]
    for name in stages:
        t0 = time.perf_counter()
        STAGES[name](args, x, y, args.out)
        print(f"[{name}] done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if child is not None and child.wait() != 0:
        print("the classifier/eval stages failed", file=sys.stderr)
        return 1
    print(f"all done in {(time.perf_counter() - start) / 60:.1f} min -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
