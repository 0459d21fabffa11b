"""`adm sample`: parse options, call runner.plan_run / runner.execute, print."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import ProgressColumn, BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import AdmError, UsageError
from .cli import app, handle_errors

if TYPE_CHECKING:
    from .request import SampleRequest
    from .runner import RunPlan

# The runner, torch.distributed and torch itself are imported when a sample runs, and after the
# request is checked: `adm --help`, `adm sample --help`, a misspelt flag and a bad value answer
# at once.


class _RateColumn(ProgressColumn):
    """Sample-steps per second (rich's speed estimate)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


def _print_plan(console: Console, plan: RunPlan) -> None:
    for s in plan.stages:
        clf = f" + classifier {s.classifier} (guidance {s.settings.guidance:g})" if s.classifier else " (no guidance)"
        console.print(f"[bold]{s.name}[/]: {s.unet}{clf}")
        console.print(f"  weights {s.unet_path}" + (f"\n  classifier {s.classifier_path}" if s.classifier_path else ""))
        console.print(f"  sampler {s.settings.sampler}, respacing {s.respacing!r} ({s.num_steps} of "
                      f"{s.diffusion_steps} steps, {s.noise_schedule} schedule)"
                      + (f", eta {s.settings.eta:g}" if s.settings.sampler == "ddim" else ""))
    classes = "random" if not (plan.class_spec or "").strip() and plan.labels else (plan.class_spec or "none (unconditional)")
    console.print(f"  {plan.num_samples} samples, seed {plan.seed}, classes {classes}, device {plan.device}, "
                  f"dtype {plan.dtype}{', CUDA graphs' if plan.cuda_graph and plan.device.startswith('cuda') else ''}, "
                  f"batch {plan.batch_size} "
                  f"-> {plan.out_dir}")


@app.command()
@handle_errors
def sample(
    res: Optional[int] = typer.Option(None, "--res", help="Image resolution: picks the paper's default model stack (64, 128, 256, 512)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry model name (see `adm models`). Default: the --res default."),
    classes: Optional[str] = typer.Option(None, "--class", help="Class index (0-999), ImageNet name or unambiguous part of one, or a comma list (sample k takes the k-th, cycling). Default: random classes (recorded)."),
    num_samples: int = typer.Option(8, "--num-samples", "-n", help="Number of images."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed S: image k uses generator seed S + k. Default: random, printed and recorded."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddpm, ddim or dpm++2m (DPM-Solver++(2M): a deterministic second-order solver, good in 15-25 steps). Default: the model's paper sampler (ddpm)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps: respacing 'N' for DDPM and dpm++2m, 'ddimN' for DDIM. Default: the model's (250 for DDPM, 25 for DDIM, 20 for dpm++2m)."),
    respacing: Optional[str] = typer.Option(None, "--respacing", help="Any respacing string the reference accepts ('250', 'ddim25', '10,15,20'), instead of --steps (not with it)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM stochasticity, 0 to 1 (0: deterministic; 1: as much noise as DDPM's posterior)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier guidance scale (0 disables). Default: the paper's scale for the model."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Registry classifier name. Default: the model's paired classifier."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A converted .safetensors (or raw .pt/.pth, converted into the cache) instead of a registry model."),
    classifier_weights: Optional[Path] = typer.Option(None, "--classifier-weights", help="Classifier file to use with --weights."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON/TOML with OpenAI flag names, for a custom --weights checkpoint."),
    upsample: bool = typer.Option(False, "--upsample", help="Two stages: ADM-G at 64 (128) then the 64->256 (128->512) upsampler, same classes; --sampler, --steps and --eta apply to both. Off by default."),
    batch_size: str = typer.Option("auto", "--batch-size", help="Images per batch, or 'auto' (CUDA: the largest that fits free device memory; CPU/MPS: 4, or ADM_CPU_BATCH)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float16 on CUDA, float32 elsewhere), float32, float16, bfloat16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the networks instead of running the fused GPU kernels. On an H200 it pays only for the 64x64 guided step at batch 64 (60.8 vs 136.4 ms eager, after a 90 s warm-up); at 256 and 512 eager is faster. Off by default."),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="Replay each step's network calls as CUDA graphs, captured on the first batch of each size: the GPU no longer waits on Python and kernel launches (guided 64x64 at batch 64: 1.5x faster on an H100). Default: on for CUDA unless --compile (on --resume: as the run began); ignored elsewhere. The images match eager runs within one level (cuDNN's backward may sum in another order)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder. Default: a new timestamped folder under ./samples/."),
    nrow: Optional[int] = typer.Option(None, "--nrow", help="Images per grid row. Default: near-square."),
    resume: bool = typer.Option(False, "--resume", help="Reuse --out: skip samples already written, then finish the run. Off by default."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network; fail if weights are not cached. Off by default (env ADM_OFFLINE=1 turns it on)."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Fetch missing weights from this base URL + file name.", envvar="ADM_MIRROR"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors and, on stdout, the grid's path. Off by default."),
) -> None:
    """Sample images from an ADM model and write a grid, per-image PNGs, samples.npz and run.json.

    Under torchrun, the processes share the samples and rank 0 writes them (see the README).
    """
    if out is not None and not out.strip():  # an unset shell variable: not "the current folder"
        raise UsageError("--out is empty; give a folder (or leave --out out for a new one under ./samples/)")
    from .request import SampleRequest, check_output, check_request

    request = SampleRequest(
        res=res, model=model, classifier=classifier, guidance=guidance, weights=weights,
        classifier_weights=classifier_weights, config=config, classes=classes, sampler=sampler, steps=steps,
        respacing=respacing, eta=eta, num_samples=num_samples, batch_size=batch_size, seed=seed, device=device,
        dtype=dtype, upsample=upsample, out=None if out is None else Path(out), nrow=nrow, offline=offline, mirror=mirror, compile=compile,
        cuda_graph=cuda_graph, resume=resume, quiet=quiet,
    )
    # Outside torchrun, what the flags, the registry and --out show to be wrong is refused before
    # torch is imported (3-5 s on a CPU). Under torchrun the team checks them (runner.plan_run, and
    # --out on rank 0), so that one rank's error is said once, by rank 0, whichever rank met it.
    solo = "WORLD_SIZE" not in os.environ
    if solo:
        check_request(request)
        check_output(request)
    from . import distributed

    try:
        team = distributed.join(device)  # a single process outside torchrun
    except AdmError as exc:
        if getattr(exc, "rank0_prints", False) and distributed.launch_says_not_root():
            raise typer.Exit(exc.exit_code) from None
        raise
    console = Console(stderr=True, quiet=quiet or not team.is_root)  # only rank 0 prints
    request = replace(request, quiet=quiet or not team.is_root)
    try:
        with team:
            result = _run(team, request, console, quiet or not team.is_root, out_checked=solo)
    except (distributed.DistributedError, KeyboardInterrupt) as exc:
        if distributed.silent_here(team, exc):  # rank 0 reports it; this rank wrote nothing
            team.leave(130 if isinstance(exc, KeyboardInterrupt) else 1)
        raise
    if team.is_root:
        rate = result.new / result.seconds if result.seconds > 0 else float("inf")
        kept = result.images - result.new  # a resumed run's samples found on disk: not made now
        console.print(f"[green]done[/]: {result.new} images in {result.seconds:.1f} s ({rate:.2f} images/s)"
                      + (f", {kept} already there" if kept else "")
                      + f" on {result.device} ({result.dtype}) -> {result.out_dir}")
        typer.echo(str(result.files["grid"]))
    team.leave()  # under torchrun: exits here (see distributed.Group.leave)


def _run(team, request: SampleRequest, console: Console, quiet: bool, out_checked: bool):
    from .outputs import read_run_plan
    from .request import check_output
    from .runner import execute

    # --out first: a folder that cannot be used fails before weights are fetched or the plan printed
    if not out_checked:
        team.from_root(lambda: check_output(request), "checking the output folder")
    fresh = request.resume and team.is_root and read_run_plan(request.out) is None
    plan = team.plan(request)
    if fresh:  # a mistyped --out would otherwise go unnoticed until the run ends
        console.print(f"[yellow]note[/]: nothing to resume in {request.out}: starting a new run there")
    _print_plan(console, plan)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("sample-steps"),
               _RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
        task = {}

        def on_stage(stage, todo):
            task["id"] = bar.add_task(stage.name, total=todo * stage.num_steps)

        return execute(plan, team=team, progress=lambda n: bar.advance(task["id"], n), on_stage=on_stage)
