"""`adm sample` as a library call: choose the model stack, sample, write the run.

``plan_run(request)`` resolves every default (registry stack, paper guidance and sampler,
classes, seed) into a ``RunPlan`` that can be printed and recorded; ``execute(plan, ...)`` loads
the models, samples in batches and writes the outputs as they complete. The CLI only parses
options into a ``SampleRequest`` (request.py, where the checks that need no torch live) and prints.
"""

from __future__ import annotations

import contextlib
import platform
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, api
from .config import UNetConfig
from .convert import ARCH_HINT
from .environment import check_env
from .errors import ConversionError, DeviceMemoryError, UsageError
from .metadata import read_config
from .outputs import (SampleWriter, batch_record, default_out_dir, discard_unstarted_run, open_run_dir,
                      portable_stage, read_run_plan, record_batch)
from .request import (SampleRequest, Stage, check_numbers, check_pair, chosen_classes, device_name, file_settings,
                      registry_stages, seed_on_record)
from .weights import file_sha256

@dataclass
class RunPlan:
    stages: list[Stage]
    num_samples: int
    seed: int
    labels: list[int] | None
    class_spec: str | None
    out_dir: Path
    device: str
    dtype: str
    batch_size: str
    compile: bool
    nrow: int | None
    resume: bool
    extra: dict = field(default_factory=dict)
    cuda_graph: bool = False

    def describe(self) -> dict[str, Any]:
        """The run's settings as plain data (run.json, PNG text chunks)."""
        return {
            "adm_cli_version": __version__,
            "stages": [{"name": s.name, "model": s.unet, "weights": str(s.unet_path),
                        "weights_sha256": file_sha256(s.unet_path), "classifier": s.classifier,
                        "classifier_weights": str(s.classifier_path) if s.classifier_path else None,
                        "classifier_sha256": file_sha256(s.classifier_path) if s.classifier_path else None,
                        **s.settings.to_dict(), "respacing": s.respacing, "num_steps": s.num_steps}
                       for s in self.stages],
            "num_samples": self.num_samples, "seed": self.seed, "classes": self.class_spec, "labels": self.labels,
            "device": self.device, "dtype": self.dtype, "batch_size": self.batch_size, "compile": self.compile,
            "cuda_graph": self.cuda_graph, "nrow": self.nrow,
        }


def pick_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    cuda = device_name(name)
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise UsageError("--device mps was asked for but this machine (or this torch build) has no MPS device")
    if cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA device is available")
    if cuda and cuda.group(1) is not None and int(cuda.group(1)) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return name


def _fetch_weights(stages: list[Stage], req: SampleRequest) -> list[Stage]:
    """Every registry stage's files, fetched once all stages are known to be valid (a bad
    upsampler stage then costs no base download). Offline, every missing file is named at once."""
    from .cache import check_fetchable, ensure_weights

    check_fetchable([name for s in stages for name in (s.unet, s.classifier) if name], offline=req.offline,
                    mirror=req.mirror)
    fetch = dict(offline=req.offline, mirror=req.mirror, quiet=req.quiet)
    for s in stages:
        s.unet_path = ensure_weights(s.unet, "unet", **fetch)
        if s.classifier:
            s.classifier_path = ensure_weights(s.classifier, "classifier", **fetch)
    return stages


def _converted(path: Path, role: str, flag: str, config: str | None = None, quiet: bool = False) -> Path:
    """``ensure_converted_file``, with convert's advice reworded for adm sample: it has no --arch,
    and its --config describes the U-Net only."""
    from .cache import ensure_converted_file

    try:
        return ensure_converted_file(path, config=config, role=role, quiet=quiet)
    except ConversionError as exc:
        if ARCH_HINT not in str(exc):
            raise
        how = ("pass --config FILE with its guided-diffusion flags, or convert it first "
               f"(`adm convert-weights {path} --arch PRESET`)" if role == "unet" else
               f"convert it first (`adm convert-weights {path} --arch PRESET` or `--config FILE`)")
        raise ConversionError(str(exc).replace(ARCH_HINT, f"{how} and pass the .safetensors file to {flag}")) from None


def _file_stage(req: SampleRequest) -> Stage:
    settings = file_settings(req)
    unet_path = _converted(req.weights, "unet", "--weights", config=str(req.config) if req.config else None,
                           quiet=req.quiet)
    cfg = read_config(unet_path)
    if isinstance(cfg, UNetConfig) and cfg.is_super_res:
        raise UsageError(f"--weights {req.weights} is an upsampler: it needs low-resolution images to start from, "
                         "which adm sample makes only with a registry model (--res 256 or 512 --upsample); "
                         "from Python, api.generate(..., low_res=...)")
    if req.res is not None and cfg.image_size != req.res:
        raise UsageError(f"--weights {req.weights} makes {cfg.image_size}x{cfg.image_size} images, not --res {req.res}")
    clf_path = None
    if req.classifier_weights is not None:
        clf_path = _converted(req.classifier_weights, "classifier", "--classifier-weights", quiet=req.quiet)
    return Stage("base", str(req.weights), unet_path, settings,
                 str(req.classifier_weights) if clf_path else None, clf_path)


def _check_stage(stage: Stage) -> None:
    """The networks' roles and shapes agree: a classifier file given as the diffusion model, a
    U-Net as the classifier, or a classifier of another resolution, channel count or class
    count would fail mid-run (or guide with nonsense); refused before the plan is printed."""
    cfg = read_config(stage.unet_path)
    clf = read_config(stage.classifier_path) if stage.classifier_path is not None else None
    check_pair(cfg, clf, stage.unet, stage.classifier)


def _labels(req: SampleRequest, stage: Stage, seed: int) -> list[int] | None:
    cfg = read_config(stage.unet_path)
    clf_cfg = read_config(stage.classifier_path) if stage.classifier_path else None
    guided = stage.settings.guidance > 0 and clf_cfg is not None
    num_classes = cfg.num_classes if cfg.class_cond else (clf_cfg.num_classes if clf_cfg else 0)
    chosen = chosen_classes(req.classes, stage.unet, cfg.class_cond, num_classes, guided, req.num_samples)
    if chosen is None:
        if not (cfg.class_cond or guided):
            return None
        return [int(c) for c in api.random_labels(seed, req.num_samples, num_classes)]
    return [chosen[k % len(chosen)] for k in range(req.num_samples)]


def resolve_request(req: SampleRequest) -> SampleRequest:
    """Fix the seed: --seed, else on --resume the recorded one, else a random one. On --resume
    an empty --class also means the recorded classes (so random labels are drawn again alike),
    and CUDA graphs neither asked for nor refused mean what the run recorded (graphed steps may
    differ from eager ones by a level, so a run goes on as it began)."""
    wants_record = req.seed is None or req.classes is None or req.cuda_graph is None
    recorded = (read_run_plan(req.out) if req.resume and wants_record else None) or {}
    seed = req.seed
    if seed is None and recorded:
        seed = seed_on_record(recorded, req.out)
    if seed is None:
        seed = secrets.randbelow(2 ** 31)
    classes = req.classes if req.classes is not None else recorded.get("classes")
    graph = req.cuda_graph
    if graph is None and isinstance(recorded.get("cuda_graph"), bool):
        graph = recorded["cuda_graph"]
    return replace(req, seed=seed, classes=classes, cuda_graph=graph)


def plan_run(req: SampleRequest) -> RunPlan:
    """Resolve a request into a fully specified, recordable plan (fetching weights if needed)."""
    check_numbers(req)
    device = pick_device(req.device)
    check_env()  # a bad ADM_CPU_BATCH, ADM_FUSED, ... fails now, not after run-plan.json is written
    req = resolve_request(req)
    seed = req.seed
    stages = registry_stages(req)
    stages = _fetch_weights(stages, req) if stages else [_file_stage(req)]
    for stage in stages:
        _check_stage(stage)
        stage.num_steps  # noqa: B018 - a bad respacing fails before the plan is printed
    labels = _labels(req, stages[0], seed)
    out_dir = req.out if req.out is not None else default_out_dir()
    graph = req.cuda_graph if req.cuda_graph is not None else torch.device(device).type == "cuda" and not req.compile
    return RunPlan(stages, req.num_samples, seed, labels, req.classes, Path(out_dir), device, req.dtype,
                   str(req.batch_size), req.compile, req.nrow, req.resume, cuda_graph=graph)


@dataclass
class RunResult:
    out_dir: Path
    files: dict[str, Path]
    seconds: float
    images: int
    device: str
    dtype: str
    new: int = 0  # images written by this call (``images`` less those a resumed run already had)


def _recorded_batches(recorded: dict) -> dict[str, int | list[int]]:
    """The batch sizes a plan records per stage (only well-formed ones: the file is editable)."""
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    found = recorded.get("resolved_batch_size")
    return {k: v for k, v in found.items() if ok(v) or (isinstance(v, list) and v and all(map(ok, v)))} \
        if isinstance(found, dict) else {}


def _load(stage: Stage, plan: RunPlan, recorded_batch=None):
    """The stage's networks, prepared, and the batch size: --batch-size N; with "auto" the one
    this run recorded (a --resume computes in the batches it began with), else measured."""
    from . import fast
    from .weights import load_model

    dtype = plan.dtype  # "auto" is resolved per network (the classifier may get another half type)
    unet = fast.prepare(load_model(stage.unet_path), device=plan.device, dtype=dtype, compile=plan.compile)
    clf = None
    if stage.classifier_path is not None:
        clf = fast.prepare(load_model(stage.classifier_path), device=plan.device, dtype=dtype, compile=plan.compile)
    if plan.batch_size == "auto" and recorded_batch is not None:
        batch = recorded_batch[-1] if isinstance(recorded_batch, list) else recorded_batch
    elif plan.batch_size == "auto":
        batch = fast.auto_batch_size(unet, clf, stage.settings, plan.device, plan.num_samples, plan.cuda_graph)
    else:
        batch = int(plan.batch_size)
    return unet, clf, batch, dtype


def execute(plan: RunPlan, *, indices: list[int] | None = None,
            progress: Callable[[int], None] | None = None,
            on_stage: Callable[[Stage, int], None] | None = None, team=None) -> RunResult:
    """Sample every index not already on disk, stage by stage, writing PNGs as batches finish.

    ``team`` (``distributed.Group``) shares the run between processes: each samples its part
    of the batches still to do, and rank 0 alone touches the output folder. None: this process
    does everything (``distributed.Solo``); both go through the same calls below.
    """
    from .distributed import Solo

    team = team or Solo()
    opened: list[bool] = []  # [created the folder] once this run has recorded its plan there
    with contextlib.ExitStack() as held:  # rank 0 holds the output folder until the run ends
        try:
            return _execute(plan, indices, progress, on_stage, team, held, opened)
        except BaseException:
            if opened and team.is_root and not plan.resume:
                # Failed before any sample (a NaN, out of memory, Ctrl-C early): the same
                # command must be able to run again as it is, not be told the folder holds a run.
                discard_unstarted_run(plan.out_dir, created=opened[0])
            raise


def _execute(plan: RunPlan, indices, progress, on_stage, team, held: contextlib.ExitStack,
             opened: list[bool]) -> RunResult:
    from . import fast

    start = time.perf_counter()
    out = plan.out_dir
    info = plan.describe()
    existed = out.exists()
    recorded = team.from_root(lambda: open_run_dir(out, info, resume=plan.resume, held=held),
                              "preparing the output folder")
    opened.append(not existed)
    known = _recorded_batches(recorded)
    # What every PNG records: the settings and the weights by name and content, not where this
    # machine keeps them (so a run resumed elsewhere, or with the same file by another path,
    # writes the same bytes); on --resume the names recorded (a renamed copy is the same run).
    stages = [portable_stage(s) for s in info["stages"]]
    for now, then in zip(stages, recorded.get("stages") or []):
        now.update({k: portable_stage(then)[k] for k in ("model", "classifier") if k in then})
    text = {"adm": "adm-cli " + __version__, "seed": str(plan.seed),
            "settings": {"stages": stages, "seed": info["seed"], "classes": info["classes"]}}
    wanted = list(range(plan.num_samples)) if indices is None else list(indices)
    computed: dict[str, int] = {}
    batches: dict[str, int | None] = {}
    writer = base = None
    for s_idx, stage in enumerate(plan.stages):
        folder = out if s_idx == len(plan.stages) - 1 else out / stage.name
        writer = SampleWriter(folder, text)

        def pending(folder=folder, writer=writer) -> list[int]:
            folder.mkdir(exist_ok=True)
            done = writer.done_indices()
            return [k for k in wanted if k not in done]

        todo = team.from_root(pending, f"listing the finished {stage.name} samples")
        computed[stage.name], used = _run_stage(plan, stage, wanted, todo, writer, base, team, progress, on_stage,
                                                known.get(stage.name))
        batches[stage.name] = batch_record(known.get(stage.name), used)
        written = len(todo)  # the last stage's: the run's images
        base = writer
    seconds = time.perf_counter() - start
    dtype = str(fast.resolve_dtype(plan.dtype, plan.device)).replace("torch.", "")
    clf_dtype = str(fast.resolve_dtype(plan.dtype, plan.device, classifier=True)).replace("torch.", "")
    if clf_dtype != dtype and any(s.classifier_path is not None for s in plan.stages):
        dtype += f" (classifier {clf_dtype})"
    run_info = {**info, "seconds": round(seconds, 3), "torch": torch.__version__,
                "python": platform.python_version(), "resolved_dtype": dtype,
                "processes": team.world_size, "computed": computed,
                # "batch_size" is what was asked for ("auto"); the float results depend on the
                # batch a sample is computed in, so record the one used (a list: calls of this
                # run used several; None: nothing was computed)
                "resolved_batch_size": batches}
    files = team.from_root(lambda: writer.finalize(plan.num_samples, run_info, plan.nrow),
                           "writing samples.npz, grid.png and run.json")
    return RunResult(out, files, seconds, len(wanted), plan.device, dtype, new=written)


def _blocks(wanted: list[int], todo: list[int], batch: int) -> list[list[int]]:
    """The batches to sample: blocks of ``batch`` consecutive sample indices, the same grid in
    every run. Float results depend (by ~1e-6, enough to flip a uint8) on the batch size a
    sample is computed in, though not on its batch mates; so each sample is computed in the
    very batch an uninterrupted one-process run with this batch size uses, whatever the number
    of processes or resumes. A block partly written when a run was killed is sampled whole."""
    members: dict[int, list[int]] = {}
    for k in wanted:
        members.setdefault(k // batch, []).append(k)
    return [members[j] for j in sorted({k // batch for k in todo})]


@contextlib.contextmanager
def _out_of_memory(plan: RunPlan, what: str, batch: int | None):
    """Running out of device (or host) memory as one line that names the remedy: the
    traceback of an allocation failure says nothing more to a user."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        if batch is None:
            remedy = "the device cannot hold these networks (is another process using it?)"
        else:
            remedy = f"pass a smaller --batch-size{'' if plan.batch_size == 'auto' else ' (or auto)'}"
        raise DeviceMemoryError(f"out of {plan.device} memory {what}{f' in batches of {batch}' if batch else ''}: "
                                f"{remedy}") from exc


def _run_stage(plan: RunPlan, stage: Stage, wanted: list[int], todo: list[int], writer: SampleWriter,
               base: SampleWriter | None, team, progress, on_stage, recorded_batch=None) -> tuple[int, int | None]:
    """Sample the blocks holding ``todo`` with one stage (this process: its share of them);
    ``base``: the previous stage's samples, which condition an upsampler (as uint8, quantised
    as the reference does). Returns the number of samples computed and the batch size used."""
    if not todo:
        if on_stage is not None:
            on_stage(stage, 0)
        return 0, None
    def load():
        with _out_of_memory(plan, f"loading the {stage.name} models", None):
            return _load(stage, plan, recorded_batch)

    unet, clf, batch, _ = team.agree(load, f"loading the {stage.name} models")
    batch = team.least(batch)  # one batch size for every process
    team.from_root(lambda: record_batch(plan.out_dir, stage.name, batch), "recording the batch size")
    blocks = _blocks(wanted, todo, batch)
    mine = team.split(blocks)
    rows = None
    if base is not None:
        rows = team.rows(blocks, lambda ks: np.stack([base.read_sample(k)[0] for k in ks]) if ks else None)
    if on_stage is not None:
        on_stage(stage, sum(map(len, blocks)))
    missing = set(todo)

    def write(indices, images, labels) -> None:  # never rewrite a sample already on disk
        keep = [j for j, k in enumerate(indices) if int(k) in missing]
        writer.write_batch([indices[j] for j in keep], images[keep], [labels[j] for j in keep])

    def generate(on_batch, step_progress) -> None:
        low_res = None
        if rows is not None:
            if not isinstance(unet.config, UNetConfig):
                raise UsageError("upsampler stage needs a U-Net")
            low_res = np.zeros((plan.num_samples, *rows.shape[1:]), dtype=np.uint8)  # indexed by sample
            low_res[[k for block in mine for k in block]] = rows
        for block in mine:
            with _out_of_memory(plan, f"sampling the {stage.name} stage", batch):
                api.generate(unet, indices=block, seed=plan.seed, classes=plan.labels, classifier=clf,
                             settings=stage.settings, batch_size=len(block), low_res=low_res,
                             progress=step_progress, on_batch=on_batch, cuda_graph=plan.cuda_graph,
                             stream=0 if base is None else 1)  # the upsampler: noise of its own

    team.sample(generate if mine else None, write, progress, stage.num_steps)
    return sum(map(len, blocks)), batch

