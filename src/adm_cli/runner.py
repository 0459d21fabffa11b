"""`adm sample` as a library call: choose the model stack, sample, write the run.

``plan_run(request)`` resolves every default (registry stack, paper guidance and sampler,
classes, seed) into a ``RunPlan`` that can be printed and recorded; ``execute(plan, ...)`` loads
the models, samples in batches and writes the outputs as they complete. The CLI only parses
options into a ``SampleRequest`` and prints.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, api
from .config import UNetConfig, guidance_mismatch
from .convert import ARCH_HINT
from .errors import ConversionError, DeviceMemoryError, OutputError, UsageError
from .outputs import (SampleWriter, batch_record, check_out_dir, default_out_dir, discard_unstarted_run,
                      open_run_dir, portable_stage, read_run_plan, record_batch)
from .samplers import DEFAULT_STEPS
from .schedule import space_timesteps
from .weights import file_sha256

MAX_SAMPLES = 10_000_000  # --num-samples: the labels of every sample are planned (and recorded) up front
SEED_LIMIT = 2 ** 63  # sample k's generator seed S + k must fit torch's and numpy's seeds (signed 64-bit)


@dataclass
class SampleRequest:
    """Everything `adm sample` accepts (None: use the default)."""

    res: int | None = None
    model: str | None = None
    classifier: str | None = None
    guidance: float | None = None
    weights: Path | None = None
    classifier_weights: Path | None = None
    config: Path | None = None
    classes: str | None = None
    sampler: str | None = None
    steps: int | None = None
    respacing: str | None = None
    eta: float = 0.0
    num_samples: int = 8
    batch_size: str = "auto"
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    upsample: bool = False
    out: Path | None = None
    nrow: int | None = None
    offline: bool = False
    mirror: str | None = None
    compile: bool = False
    cuda_graph: bool | None = None  # None: on for CUDA unless compile (a replay issues a step's launches at once)
    resume: bool = False
    quiet: bool = False  # no download bars or conversion messages (errors still raise)


@dataclass
class Stage:
    """One diffusion model (and optional classifier) run over all sample indices."""

    name: str
    unet: str  # registry name, or the weights path
    unet_path: Path  # (None only while a registry stage's weights are still to be fetched)
    settings: api.SamplerSettings
    classifier: str | None = None
    classifier_path: Path | None = None

    @property
    def respacing(self) -> str:
        return self.settings.respacing_for(self.diffusion_steps)

    @property
    def diffusion_steps(self) -> int:
        return self._config.diffusion_steps

    @property
    def noise_schedule(self) -> str:
        return self._config.noise_schedule

    @functools.cached_property
    def _config(self):
        from .weights import read_config

        return read_config(self.unet_path)

    @property
    def num_steps(self) -> int:
        """Network evaluations per sample."""
        return len(space_timesteps(self.diffusion_steps, self.respacing))


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
    cuda = re.fullmatch(r"cuda(?::([0-9]+))?", name)
    if name not in ("cpu", "mps") and cuda is None:
        raise UsageError(f"unknown --device {name!r} (auto, cpu, cuda, cuda:N or mps)")
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise UsageError("--device mps was asked for but this machine (or this torch build) has no MPS device")
    if cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA device is available")
    if cuda and cuda.group(1) is not None and int(cuda.group(1)) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return name


def _registry_stage(name: str, req: SampleRequest, *, stage: str, guidance: float | None,
                    classifier: str | None) -> Stage:
    from .registry import load_registry

    entry = load_registry().get(name)
    if "unet" not in entry.roles:
        raise UsageError(f"{name} holds no diffusion model (it is a classifier); pick one with --model")
    scale = guidance if guidance is not None else (entry.guidance or 0.0)
    clf = classifier if classifier is not None else entry.classifier
    if "classifier" in entry.roles and clf is None:
        clf = name  # an mmagic adm-g file carries its own classifier
    sampler = req.sampler or entry.sampler or "ddpm"
    steps = req.steps or (entry.steps if sampler == (entry.sampler or "ddpm") else None)
    settings = api.SamplerSettings(sampler, steps=None if req.respacing is not None else steps or DEFAULT_STEPS.get(sampler),
                                   respacing=req.respacing, eta=req.eta, guidance=scale)
    # Bad steps and classes fail here, from the registry, before a download of up to 2 GB.
    if (cfg := entry.config_for("unet")) is not None:
        settings.respacing_for(cfg.diffusion_steps)
    if stage == "base":
        if entry.upsampler_base:
            raise UsageError(f"{name} is an upsampler ({entry.upsampler_base}x{entry.upsampler_base} images to "
                             f"{entry.resolution}x{entry.resolution}): `adm sample --res {entry.resolution} --upsample` "
                             "samples a base model and upsamples its images")
        if scale > 0 and not clf:
            raise UsageError(f"--guidance {scale:g} needs a classifier and {name} has none in the registry: pass "
                             "--classifier NAME (see `adm models`) or --guidance 0")
        _check_classes(req, entry, clf if scale > 0 else None)
    if clf and (scale > 0 or classifier is not None):  # one that cannot guide this model (or a name
        # typed but unused at guidance 0, which the plan shows): refused before a download
        clf_entry = load_registry().get(clf)
        if "classifier" not in clf_entry.roles:
            raise UsageError(f"{clf} holds a diffusion model, not a classifier")
        unet_cfg, clf_cfg = _entry_config(entry, "unet"), _entry_config(clf_entry, "classifier")
        if unet_cfg is not None and clf_cfg is not None:
            _check_pair(unet_cfg, clf_cfg, name, clf)
    return Stage(stage, name, None, settings, clf if (clf and scale > 0) else None)


def _fetch_weights(stages: list[Stage], req: SampleRequest) -> list[Stage]:
    """Every registry stage's files, fetched once all stages are known to be valid (a bad
    upsampler stage then costs no base download). Offline, every missing file is named at once."""
    from .cache import ensure_weights, missing_offline

    missing_offline(dict.fromkeys(name for s in stages for name in (s.unet, s.classifier) if name),
                    offline=req.offline)
    fetch = dict(offline=req.offline, mirror=req.mirror, quiet=req.quiet)
    for s in stages:
        s.unet_path = ensure_weights(s.unet, "unet", **fetch)
        if s.classifier:
            s.classifier_path = ensure_weights(s.classifier, "classifier", **fetch)
    return stages


def _entry_config(entry, role: str):
    """A registry entry's architecture for ``role``: from the registry, or from the metadata of
    a bundled file (no download either way); None: known only once the file is fetched."""
    from .weights import read_config

    if (cfg := entry.config_for(role)) is not None or not entry.bundled:
        return cfg
    return read_config(entry.bundled_path())


def _chosen_classes(spec: str | None, name: str, class_cond: bool, num_classes: int | None,
                    guided: bool, num_samples: int) -> list[int] | None:
    """--class resolved for one model (None: not given); refused for an unconditional model
    that no classifier guides, and where -n is too few to use every class listed (sample k
    takes the list's class k mod its length)."""
    from .imagenet import resolve_classes

    chosen = resolve_classes(spec, num_classes or 1000) if spec else None
    if chosen is not None and not class_cond and not guided:
        raise UsageError(f"{name} is unconditional: --class needs a classifier and --guidance > 0")
    if chosen is not None and len(chosen) > num_samples:
        raise UsageError(f"--class lists {len(chosen)} classes but -n is {num_samples}: sample k takes the k-th "
                         f"class (cycling), so give -n {len(chosen)} or more")
    return chosen


def _check_classes(req: SampleRequest, entry, classifier: str | None) -> None:
    """--class against the registry's class counts, before any download (``_labels`` resolves
    it again against the weights' own configs)."""
    from .registry import load_registry

    clf_classes = load_registry().get(classifier).num_classes if classifier is not None else None
    _chosen_classes(req.classes, entry.name, bool(entry.class_cond),
                    entry.num_classes if entry.class_cond else clf_classes, classifier is not None, req.num_samples)


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
    from .weights import read_config

    if req.classifier is not None:
        raise UsageError("--classifier picks a registry classifier for a registry --model; "
                         "with --weights pass the file with --classifier-weights")
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
    scale = req.guidance if req.guidance is not None else (1.0 if clf_path else 0.0)
    sampler = req.sampler or "ddpm"
    settings = api.SamplerSettings(sampler, steps=None if req.respacing is not None else req.steps or DEFAULT_STEPS.get(sampler),
                                   respacing=req.respacing, eta=req.eta, guidance=scale)
    if scale > 0 and clf_path is None:
        raise UsageError("--guidance > 0 with --weights needs --classifier-weights")
    return Stage("base", str(req.weights), unet_path, settings,
                 str(req.classifier_weights) if clf_path else None, clf_path)


def _stages(req: SampleRequest) -> list[Stage]:
    from .registry import load_registry

    if req.weights is not None:
        if req.model or req.upsample:
            raise UsageError("--weights cannot be combined with --model or --upsample")
        return [_file_stage(req)]
    if req.classifier_weights is not None or req.config is not None:
        given = "--classifier-weights" if req.classifier_weights is not None else "--config"
        raise UsageError(f"{given} goes with --weights FILE; a registry model brings its own "
                         "(use --classifier NAME to pick another registry classifier)")
    registry = load_registry()
    if req.upsample:
        base, up = registry.upsample_pair(req.res)
        if req.model is not None:
            _check_upsampler_base(registry.get(req.model), up)
        return _fetch_weights([_registry_stage(req.model or base.name, req, stage="base", guidance=req.guidance,
                                               classifier=req.classifier),
                               _registry_stage(up.name, req, stage="upsampler", guidance=0.0, classifier=None)], req)
    if req.model is None and req.res is None:
        raise UsageError("adm sample needs --res N (64, 128, 256, 512) or --model NAME (see `adm models`)")
    name = req.model or registry.default_for(req.res).name
    entry = registry.get(name)
    if req.res is not None and entry.resolution != req.res:
        raise UsageError(f"--model {name} makes {entry.resolution}x{entry.resolution} images, not --res {req.res}")
    return _fetch_weights([_registry_stage(name, req, stage="base", guidance=req.guidance,
                                           classifier=req.classifier)], req)


def _check_upsampler_base(base, up) -> None:
    """--model under --upsample: the upsampler conditions on the base model's images (its input
    size) and labels (the same classes), so a base of another size or class set is refused
    before any download."""
    if "unet" not in base.roles:
        raise UsageError(f"{base.name} holds no diffusion model (it is a classifier); pick one with --model")
    if base.resolution != up.upsampler_base:
        raise UsageError(f"--upsample to {up.resolution} starts from {up.upsampler_base}x{up.upsampler_base} images; "
                         f"--model {base.name} makes {base.resolution}x{base.resolution} ones")
    if up.class_cond and (not base.class_cond or base.num_classes != up.num_classes):
        raise UsageError(f"--upsample: {up.name} takes the {up.num_classes} ImageNet classes of a class-conditional "
                         f"base model; --model {base.name} is " + (
                             f"conditioned on {base.num_classes} classes" if base.class_cond else "unconditional"))


def _check_stage(stage: Stage) -> None:
    """The networks' roles and shapes agree: a classifier file given as the diffusion model, a
    U-Net as the classifier, or a classifier of another resolution, channel count or class
    count would fail mid-run (or guide with nonsense); refused before the plan is printed."""
    from .weights import read_config

    cfg = read_config(stage.unet_path)
    clf = read_config(stage.classifier_path) if stage.classifier_path is not None else None
    _check_pair(cfg, clf, stage.unet, stage.classifier)


def _check_pair(cfg, clf, unet: str, classifier: str | None) -> None:
    from .config import ClassifierConfig

    if not isinstance(cfg, UNetConfig):
        raise UsageError(f"{unet} holds a classifier, not a diffusion model")
    if clf is None:
        return
    if not isinstance(clf, ClassifierConfig):
        raise UsageError(f"{classifier} holds a diffusion model, not a classifier")
    if (found := guidance_mismatch(cfg, clf)) is not None:
        what, theirs, ours = found
        raise UsageError(f"classifier {classifier} does not fit {unet}: its {what} is {theirs}, the model's {ours}")


def _validate_numbers(req: SampleRequest) -> None:
    if req.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {req.num_samples}")
    if req.num_samples > MAX_SAMPLES:
        raise UsageError(f"--num-samples must be at most {MAX_SAMPLES:,}, got {req.num_samples}; "
                         "split larger sets into runs whose --seed values are at least -n apart "
                         "(sample k uses seed S + k)")
    if req.seed is not None and not 0 <= req.seed <= SEED_LIMIT - req.num_samples:
        raise UsageError(f"--seed must be in 0..{SEED_LIMIT - req.num_samples} for {req.num_samples} samples "
                         f"(sample k uses seed S + k, below 2**63), got {req.seed}")
    if req.steps is not None and req.steps < 2:
        raise UsageError(f"--steps must be at least 2, got {req.steps}")
    if req.steps is not None and req.respacing is not None:
        raise UsageError("--steps and --respacing both choose the timesteps: give one of them")
    # ASCII digits only: str.isdigit() also accepts "²", which int() then rejects.
    if req.batch_size != "auto" and (not re.fullmatch(r"[0-9]+", str(req.batch_size)) or int(req.batch_size) < 1):
        raise UsageError(f"--batch-size must be a positive integer or 'auto', got {req.batch_size!r}")
    if req.res is not None and req.res not in (64, 128, 256, 512) and req.model is None and req.weights is None:
        raise UsageError(f"--res {req.res} is not available (choose 64, 128, 256 or 512)")
    if req.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"unknown --dtype {req.dtype!r} (auto, float32, float16, bfloat16)")
    if req.nrow is not None and req.nrow < 1:
        raise UsageError(f"--nrow must be at least 1, got {req.nrow}")
    if req.resume and req.out is None:
        raise UsageError("--resume needs --out DIR, the folder of the run to finish")
    if req.cuda_graph and req.compile:
        raise UsageError("--cuda-graph and --compile do not combine: choose one")


def _labels(req: SampleRequest, stage: Stage, seed: int) -> list[int] | None:
    from .weights import read_config

    cfg = read_config(stage.unet_path)
    clf_cfg = read_config(stage.classifier_path) if stage.classifier_path else None
    guided = stage.settings.guidance > 0 and clf_cfg is not None
    num_classes = cfg.num_classes if cfg.class_cond else (clf_cfg.num_classes if clf_cfg else 0)
    chosen = _chosen_classes(req.classes, stage.unet, cfg.class_cond, num_classes, guided, req.num_samples)
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
        seed = recorded.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise UsageError(f"--resume: the plan in {req.out} records no seed; pass --seed or choose a new --out")
    if seed is None:
        seed = secrets.randbelow(2 ** 31)
    classes = req.classes if req.classes is not None else recorded.get("classes")
    graph = req.cuda_graph
    if graph is None and isinstance(recorded.get("cuda_graph"), bool):
        graph = recorded["cuda_graph"]
    return replace(req, seed=seed, classes=classes, cuda_graph=graph)


def check_output(req: SampleRequest) -> None:
    """Refuse an unusable --out before anything is fetched or printed. The CLI calls this on
    rank 0 only: the other processes of a torchrun run plan with resume off and need not see
    the folder."""
    if req.out is not None:
        check_out_dir(Path(req.out), resume=req.resume)
        return
    try:  # the default, a new folder under ./samples
        check_out_dir(default_out_dir())
    except OutputError as exc:
        raise OutputError(f"{exc} (the default output folder: pass --out DIR)") from None


def plan_run(req: SampleRequest) -> RunPlan:
    """Resolve a request into a fully specified, recordable plan (fetching weights if needed)."""
    from . import fast

    _validate_numbers(req)
    device = pick_device(req.device)
    if req.batch_size == "auto" and torch.device(device).type != "cuda":
        fast.cpu_batch_size()  # a bad ADM_CPU_BATCH fails now, not after run-plan.json is written
    fast.check_env()  # and a bad ADM_WINOGRAD or ADM_FUSED
    req = resolve_request(req)
    seed = req.seed
    stages = _stages(req)
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

