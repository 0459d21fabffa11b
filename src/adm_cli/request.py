"""What `adm sample` is asked, checked before anything heavy runs.

A ``SampleRequest`` holds the options as given (None: the default). The checks here read the
flags, the registry and, for the bundled demo models, their files' metadata: no torch, no
download, no conversion. ``runner.plan_run`` resolves a checked request into a plan.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ClassifierConfig, UNetConfig, guidance_mismatch
from .environment import check_env
from .errors import OutputError, UsageError, WeightsError
from .flags import load_config_file
from .formats import check_format
from .metadata import read_config
from .outputs import check_out_dir, default_out_dir, read_run_plan
from .respacing import space_timesteps
from .settings import DEFAULT_STEPS, SamplerSettings

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
    settings: SamplerSettings
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
        return read_config(self.unet_path)

    @property
    def num_steps(self) -> int:
        """Network evaluations per sample."""
        return len(space_timesteps(self.diffusion_steps, self.respacing))


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
    settings = SamplerSettings(sampler, steps=None if req.respacing is not None else steps or DEFAULT_STEPS.get(sampler),
                               respacing=req.respacing, eta=req.eta, guidance=scale)
    # Bad steps and classes fail here, from the registry (or a bundled file's metadata), before a
    # download of up to 2 GB.
    if (unet_cfg := _entry_config(entry, "unet")) is not None:
        settings.respacing_for(unet_cfg.diffusion_steps)
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
        clf_cfg = _entry_config(clf_entry, "classifier")
        if unet_cfg is not None and clf_cfg is not None:
            check_pair(unet_cfg, clf_cfg, name, clf)
    return Stage(stage, name, None, settings, clf if (clf and scale > 0) else None)


def _entry_config(entry, role: str):
    """A registry entry's architecture for ``role``: from the registry, or from the metadata of
    a bundled file (no download either way); None: known only once the file is fetched."""
    if (cfg := entry.config_for(role)) is not None or not entry.bundled:
        return cfg
    return read_config(entry.bundled_path())


def chosen_classes(spec: str | None, name: str, class_cond: bool, num_classes: int | None,
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
    """--class against the registry's class counts, before any download (``runner._labels``
    resolves it again against the weights' own configs)."""
    from .registry import load_registry

    clf_classes = load_registry().get(classifier).num_classes if classifier is not None else None
    chosen_classes(req.classes, entry.name, bool(entry.class_cond),
                   entry.num_classes if entry.class_cond else clf_classes, classifier is not None, req.num_samples)


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


def check_pair(cfg, clf, unet: str, classifier: str | None) -> None:
    if not isinstance(cfg, UNetConfig):
        raise UsageError(f"{unet} holds a classifier, not a diffusion model")
    if clf is None:
        return
    if not isinstance(clf, ClassifierConfig):
        raise UsageError(f"{classifier} holds a diffusion model, not a classifier")
    if (found := guidance_mismatch(cfg, clf)) is not None:
        what, theirs, ours = found
        raise UsageError(f"classifier {classifier} does not fit {unet}: its {what} is {theirs}, the model's {ours}")


def check_numbers(req: SampleRequest) -> None:
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
    device_name(req.device)
    if req.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"unknown --dtype {req.dtype!r} (auto, float32, float16, bfloat16)")
    if req.nrow is not None and req.nrow < 1:
        raise UsageError(f"--nrow must be at least 1, got {req.nrow}")
    if req.resume and req.out is None:
        raise UsageError("--resume needs --out DIR, the folder of the run to finish")
    if req.cuda_graph and req.compile:
        raise UsageError("--cuda-graph and --compile do not combine: choose one")


def check_output(req: SampleRequest) -> None:
    """Refuse an unusable --out before anything is fetched or printed. The CLI calls this before
    it imports torch, or under torchrun on rank 0 only: the other processes plan with resume off
    and need not see the folder."""
    if req.out is not None:
        check_out_dir(Path(req.out), resume=req.resume)
        if req.resume and req.seed is None and (recorded := read_run_plan(req.out)):
            seed_on_record(recorded, req.out)
        return
    try:  # the default, a new folder under ./samples
        check_out_dir(default_out_dir())
    except OutputError as exc:
        raise OutputError(f"{exc} (the default output folder: pass --out DIR)") from None


def seed_on_record(recorded: dict, out: Path | None) -> int:
    """The seed a run's recorded plan holds, which --resume without --seed goes on with."""
    seed = recorded.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"--resume: the plan in {out} records no seed; pass --seed or choose a new --out")
    return seed


def device_name(name: str) -> re.Match | None:
    """--device's spelling (whether the machine has it is runner.pick_device's to say): the
    match of cuda[:N], None for auto, cpu and mps."""
    cuda = re.fullmatch(r"cuda(?::([0-9]+))?", name)
    if name not in ("auto", "cpu", "mps") and cuda is None:
        raise UsageError(f"unknown --device {name!r} (auto, cpu, cuda, cuda:N or mps)")
    return cuda


def registry_stages(req: SampleRequest) -> list[Stage]:
    """The registry stages the request names, checked against the registry alone (names, roles,
    steps, classes, which classifier fits): nothing is fetched yet, so their paths are None.
    [] for --weights FILE, once the flags that cannot go with it are refused."""
    from .registry import load_registry

    if req.weights is not None:
        if req.model or req.upsample:
            raise UsageError("--weights cannot be combined with --model or --upsample")
        if req.classifier is not None:
            raise UsageError("--classifier picks a registry classifier for a registry --model; "
                             "with --weights pass the file with --classifier-weights")
        return []
    if req.classifier_weights is not None or req.config is not None:
        given = "--classifier-weights" if req.classifier_weights is not None else "--config"
        raise UsageError(f"{given} goes with --weights FILE; a registry model brings its own "
                         "(use --classifier NAME to pick another registry classifier)")
    registry = load_registry()
    if req.upsample:
        base, up = registry.upsample_pair(req.res)
        if req.model is not None:
            _check_upsampler_base(registry.get(req.model), up)
        return [_registry_stage(req.model or base.name, req, stage="base", guidance=req.guidance,
                                classifier=req.classifier),
                _registry_stage(up.name, req, stage="upsampler", guidance=0.0, classifier=None)]
    if req.model is None and req.res is None:
        raise UsageError("adm sample needs --res N (64, 128, 256, 512) or --model NAME (see `adm models`)")
    name = req.model or registry.default_for(req.res).name
    entry = registry.get(name)
    if req.res is not None and entry.resolution != req.res:
        raise UsageError(f"--model {name} makes {entry.resolution}x{entry.resolution} images, not --res {req.res}")
    return [_registry_stage(name, req, stage="base", guidance=req.guidance, classifier=req.classifier)]


def file_settings(req: SampleRequest) -> SamplerSettings:
    """How --weights FILE samples: guided (scale 1 unless --guidance says) when
    --classifier-weights is given."""
    scale = req.guidance if req.guidance is not None else (1.0 if req.classifier_weights is not None else 0.0)
    sampler = req.sampler or "ddpm"
    settings = SamplerSettings(sampler, steps=None if req.respacing is not None else req.steps or DEFAULT_STEPS.get(sampler),
                               respacing=req.respacing, eta=req.eta, guidance=scale)
    if scale > 0 and req.classifier_weights is None:
        raise UsageError("--guidance > 0 with --weights needs --classifier-weights")
    return settings


def check_request(req: SampleRequest) -> None:
    """Refuse what the flags and the registry alone show to be wrong. `adm sample` calls this
    before it imports torch, so a slip costs about a second, not the 3-5 s torch takes
    to import; ``runner.plan_run`` makes every one of these checks again (it is the library's
    entry) and those that need torch, the devices or the weights files."""
    check_numbers(req)
    check_env()
    if stages := registry_stages(req):
        from .cache import check_fetchable

        check_fetchable([name for s in stages for name in (s.unet, s.classifier) if name], offline=req.offline,
                        mirror=req.mirror)
        return
    file_settings(req)
    given = [Path(p) for p in (req.weights, req.classifier_weights) if p is not None]
    for path in given:
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
    if req.config is not None:
        load_config_file(req.config)
    for path in given:  # last, as the converter reads it: the flags' faults are said first
        check_format(path)
