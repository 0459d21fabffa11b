"""Writing a run to disk: one PNG per sample, grid.png, samples.npz, run.json.

Every file is written under a temporary name and renamed when complete, so an interrupted run
leaves only whole files, and nothing existing is ever overwritten. Per-sample PNGs are written
as batches finish; ``finalize`` assembles the npz (OpenAI's evaluator layout: ``arr_0`` uint8
NHWC, ``arr_1`` int64 labels) and the grid from them, so a resumed run ends with exactly the
files an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import uuid
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from .download import sha256_file
from .errors import OutputError, UsageError

PNG_NAME = "{:06d}.png"
_PNG_RE = re.compile(r"^(\d{6,})\.png$")
# The resolved plan, written before the first sample so that --resume can check against it;
# run.json (a superset) replaces it when the run completes.
PLAN_NAME = "run-plan.json"


# Our temporary files: ".<name>.<12 hex digits>.incomplete", one per writer (threads too).
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.incomplete$")
# grid.png shows at most this many samples (the first ones): a grid of a 50,000-sample run would
# be a 57,000-pixel square, gigabytes in memory, and no use to look at.
GRID_MAX = 256


def _atomic_write(path: Path, data: bytes) -> None:
    _atomic_stream(path, lambda f: f.write(data))


def _atomic_stream(path: Path, write: Callable[[BinaryIO], Any], *, same_ok: bool = False,
                   replace: bool = False) -> None:
    """Write a file through ``write(f)`` under a temporary name, then rename it into place.
    An existing file is never replaced (``replace``: our own plan, rewritten whole); with
    ``same_ok`` one with the same bytes is kept (a resumed run killed while finalizing),
    compared by hash, not by reading it whole."""
    if path.exists() and not (same_ok or replace):
        raise OutputError(f"refusing to overwrite existing file {path}")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.incomplete")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and not replace:
            if sha256_file(path) != sha256_file(tmp):
                raise OutputError(f"refusing to overwrite existing file {path}")
            return
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def png_bytes(image: np.ndarray, text: Mapping[str, Any] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile NHWC images into a near-square grid (``nrow`` images per row)."""
    n, h, w, c = images.shape
    nrow = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid


def default_out_dir(root: Path = Path("samples")) -> Path:
    base = root / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def _sample_file(path: Path) -> str | None:
    """The name of a sample or summary file of some run in ``path`` or in one of its stage
    folders (an upsampled run keeps its base samples in ``base/``); None: there is none."""
    for p in path.iterdir():
        if p.name in ("grid.png", "samples.npz") or _PNG_RE.match(p.name):
            return p.name
        if p.is_dir() and (q := next((q for q in p.iterdir() if _PNG_RE.match(q.name)), None)):
            return f"{p.name}/{q.name}"
    return None


def check_out_dir(path: Path, *, resume: bool = False, held: bool = False) -> None:
    """Refuse an output folder that cannot be used, creating nothing (so that a bad --out
    fails before weights are fetched or the plan is printed). ``held``: this process holds
    the folder (``hold_run_dir``); otherwise a run in progress there is refused."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} exists and is not a folder")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"--out {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if not path.is_dir():
        # It will be created: its nearest existing ancestor must be a folder we can write in.
        parent = next((a for a in path.absolute().parents if a.exists() or a.is_symlink()), None)
        if parent is not None and not parent.is_dir():
            raise OutputError(f"cannot create --out {path}: {parent} is not a folder")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot create --out {path}: {parent} is not writable")
        return
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"--out {path} is not writable")
    if not held:
        with hold_run_dir(path):  # a probe: taken and let go
            pass
    if not resume:
        summary = ("grid.png", "samples.npz", "run.json", PLAN_NAME)
        taken = [p.name for p in path.iterdir() if p.name in summary or _PNG_RE.match(p.name)]
        if taken:
            # --resume needs the recorded plan: without one it would be refused too (below)
            resumable = read_run_plan(path) is not None
            raise OutputError(f"--out {path} already holds a run ({taken[0]}, ...); choose a new folder"
                              + (" or pass --resume" if resumable else " (no run-plan.json or run.json to --resume from)"))
    elif read_run_plan(path) is None and (found := _sample_file(path)):
        # Without the recorded plan nothing says which run these samples belong to: finishing
        # them with this command's settings could mix two runs.
        raise OutputError(f"--resume: {path} holds samples ({found}, ...) but no {PLAN_NAME} or run.json "
                          "recording their run; choose a new --out")


def prepare_out_dir(path: Path, *, resume: bool = False, held: contextlib.ExitStack | None = None) -> Path:
    """Create the output folder, or check that it can be (re)used without overwriting;
    ``held``: hold it (``hold_run_dir``) until this stack closes, checked again once held."""
    check_out_dir(path, resume=resume)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    if held is not None:
        held.enter_context(hold_run_dir(path))
        check_out_dir(path, resume=resume, held=True)  # a run that ended meanwhile left its files
    if resume:
        # Our temporary files left by writers killed mid-write (in the folder and its stage
        # folders): never counted as samples; tidy them away (held: no live writer's).
        for folder in (path, *(p for p in path.iterdir() if p.is_dir())):
            for stale in folder.iterdir():
                if _TMP_RE.match(stale.name) and stale.is_file():
                    stale.unlink(missing_ok=True)
    try:
        probe = path / f".adm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    return path


def write_run_plan(out_dir: Path, plan: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / PLAN_NAME
    _atomic_write(path, (json.dumps(plan, indent=2, sort_keys=True, default=str) + "\n").encode())
    return path


def read_run_plan(out_dir: Path | None) -> dict | None:
    """The plan recorded by an earlier run in ``out_dir`` (None: there is none)."""
    if out_dir is None:
        return None
    path = next((p for p in (Path(out_dir) / PLAN_NAME, Path(out_dir) / "run.json") if p.is_file()), None)
    if path is None:
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        recorded, problem = None, str(exc)
    else:
        problem = plan_problem(recorded)
    if problem is not None:
        # Not "remove it": a folder of samples without its plan cannot be resumed safely.
        raise OutputError(f"cannot read {path} ({problem}); choose a new --out to start the run afresh")
    return recorded


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count


def _is_batch(value: Any) -> bool:
    """A stage's recorded batch size(s): see ``batch_record``."""
    return value is None or _is_int(value) or (isinstance(value, list) and all(map(_is_int, value)))


# What each field of a recorded plan must be ("or null": None too): the types RunPlan.describe()
# writes, resolved_batch_size (record_batch) and the report run.json adds. --resume reads these
# back into comparisons, the printed plan and the next run, where another type would surface as
# a traceback, so a file edited into another shape is refused whole, by name.
_KINDS: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "an integer": _is_int,
    "a number": lambda v: _is_int(v) or isinstance(v, float),
    "a boolean": lambda v: isinstance(v, bool),
    "a list of integers": lambda v: isinstance(v, list) and all(map(_is_int, v)),
    "a list of objects": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    "an object": lambda v: isinstance(v, dict),
    "an object of batch sizes": lambda v: isinstance(v, dict) and all(map(_is_batch, v.values())),
}
_PLAN_FIELDS = {
    "adm_cli_version": "a string", "stages": "a list of objects", "num_samples": "an integer", "seed": "an integer",
    "classes": "a string or null", "labels": "a list of integers or null", "device": "a string", "dtype": "a string",
    "batch_size": "a string", "compile": "a boolean", "cuda_graph": "a boolean", "nrow": "an integer or null",
    "resolved_batch_size": "an object of batch sizes",
    "seconds": "a number", "torch": "a string", "python": "a string", "resolved_dtype": "a string",
    "processes": "an integer", "computed": "an object",
}
_STAGE_FIELDS = {
    "name": "a string", "model": "a string or null", "weights": "a string", "weights_sha256": "a string",
    "classifier": "a string or null", "classifier_weights": "a string or null",
    "classifier_sha256": "a string or null", "sampler": "a string", "steps": "an integer or null",
    "respacing": "a string or null", "eta": "a number", "guidance": "a number", "clip_x0": "a boolean",
    "num_steps": "an integer",
}


def _wrong_type(data: Mapping[str, Any], fields: Mapping[str, str], prefix: str = "") -> str | None:
    """The first field of ``data`` that is not of its kind, described; None: all are. Absent
    fields are left to the readers (a plan of an earlier version lacks the newer ones), and
    fields unknown here are kept (a later version's)."""
    for key, kind in fields.items():
        if key not in data:
            continue
        value, base = data[key], kind.removesuffix(" or null")
        if not ((value is None and base != kind) or _KINDS[base](value)):
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"{prefix}{key} is {shown}, not {kind}"
    return None


def plan_problem(recorded: Any) -> str | None:
    """Why a parsed run-plan.json / run.json cannot be a recorded plan (None: it can)."""
    if not isinstance(recorded, dict):
        return "not a JSON object"
    if problem := _wrong_type(recorded, _PLAN_FIELDS):
        return problem
    for k, stage in enumerate(recorded.get("stages") or []):  # a list of objects by now
        if problem := _wrong_type(stage, _STAGE_FIELDS, f"stages[{k}]."):
            return problem
    return None


# Recorded by later versions only: a plan from an earlier one that lacks them is not refused.
_NEWER_STAGE_KEYS = ("weights_sha256", "classifier_sha256")
_NEWER_KEYS = ("nrow",)


def portable_stage(stage: Mapping[str, Any]) -> dict[str, Any]:
    """A described stage without where this machine keeps the weights: the models by file (or
    registry) name, the weights by sha256 only. What the PNGs record and what runs compare."""
    names = {k: Path(stage[k]).name if stage.get(k) else None for k in ("model", "classifier")}
    return {**{k: v for k, v in stage.items() if k not in ("weights", "classifier_weights")}, **names}


def _identity(info: Mapping[str, Any], like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The part of a described plan (``RunPlan.describe()``) that decides the files: it must
    match between the processes of one run and between a run and its --resume. The weights
    count by content (sha256) and model name, the device by its kind; left out: the device's
    index, the batch size, where the weight files live and what they are called (when their
    sha256 is recorded) and the steps shorthand (the resolved
    respacing, kept, decides the timesteps; a plan recorded before --respacing cleared the
    steps still resumes). ``like``: the recorded plan, whose missing newer keys are left out
    here too."""
    old_stages = (like or {}).get("stages") or [{}]
    skip = ("steps", *(k for k in _NEWER_STAGE_KEYS if like is not None and k not in old_stages[0]))

    # Where the weights are known by sha256, their file names do not count (a copy renamed is
    # the same run); a plan from before the sha256 was recorded compares names.
    by_content = tuple(name for name, sha in (("model", "weights_sha256"), ("classifier", "classifier_sha256"))
                       if sha not in skip)

    def stage(s: Mapping[str, Any]) -> dict:
        return {k: v for k, v in portable_stage(s).items() if k not in skip and k not in by_content}

    keys = ("num_samples", "seed", "labels", "dtype", *(k for k in _NEWER_KEYS if like is None or k in like))
    # The kind of device counts (CPU and CUDA generators draw different noise), not its index.
    kind = str(info.get("device") or "").split(":")[0]
    return {"stages": [stage(s) for s in info.get("stages", [])], **{k: info.get(k) for k in keys},
            "device_type": kind}


def plan_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting (name, value in a, value in b) on which two described plans differ
    (``a``: the recorded or the root process's one)."""
    # The settings a user types first: labels follow from the seed and --class, so a changed
    # --seed is named as such, not as the first label it changed.
    first = ("seed", "num_samples", "stages", "dtype", "device_type", "nrow")

    def walk(x: Any, y: Any, path: str):
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=lambda k: (first.index(k) if k in first else len(first), k)):
                if found := walk(x.get(key), y.get(key), f"{path}.{key}" if path else key):
                    return found
            return None
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            return next((f for i, (u, v) in enumerate(zip(x, y)) if (f := walk(u, v, f"{path}[{i}]"))), None)
        return None if x == y else (path, x, y)

    # through JSON, so that a plan read back from run-plan.json compares equal to a fresh one
    return walk(*(json.loads(json.dumps(_identity(i, like=a), default=str)) for i in (a, b)), "")


@contextlib.contextmanager
def hold_run_dir(path: Path) -> Iterator[None]:
    """Hold an output folder for one run: a second `adm sample` on the same --out (a --resume
    started while the first still runs) is refused instead of racing it for the same samples.
    An advisory lock on the folder itself (flock), so nothing is left behind and a killed run
    holds nothing. Where folders cannot be locked (Windows, some network filesystems) runs go
    on without: every file is still written whole and never over another."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):  # no flock (Windows), or a folder that cannot be opened
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(f"--out {path} is in use by another adm sample run; wait for it to end "
                                  "(then --resume it if it stopped early) or choose another folder") from None
            except OSError:  # e.g. ENOLCK: no locks on this filesystem
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def discard_unstarted_run(path: Path, *, created: bool) -> None:
    """After a new run failed: if it wrote no sample, take back what it made (its recorded plan,
    empty stage folders, the folder itself if the run created it). Call holding the folder."""
    with contextlib.suppress(OSError):
        if not path.is_dir() or _sample_file(path) is not None:
            return
        (path / PLAN_NAME).unlink(missing_ok=True)
        for p in path.iterdir():
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        if created and not any(path.iterdir()):
            path.rmdir()


def open_run_dir(path: Path, plan: Mapping[str, Any], *, resume: bool = False,
                 held: contextlib.ExitStack | None = None) -> dict[str, Any]:
    """Create (on --resume: reopen) the output folder and record the plan before any sample;
    a resumed run must have the recorded plan. ``held``: the folder is held for the run
    (``hold_run_dir``) until this stack closes. Returns the recorded plan (``plan`` for a new run)."""
    prepare_out_dir(path, resume=resume, held=held)
    recorded = read_run_plan(path)
    if recorded is None:
        write_run_plan(path, plan)
        return dict(plan)
    if (diff := plan_difference(recorded, plan)) is not None:
        key, then, now = diff
        raise UsageError(f"--resume: {path} was started with {key} = {json.dumps(then)}, this command gives "
                         f"{json.dumps(now)}; repeat the original command or choose a new --out")
    return recorded


def batch_record(old: Any, used: int | None) -> Any:
    """The batch size(s) a stage's samples were computed with: one int; a list in order of use
    when calls of one run differed (an explicit --batch-size on --resume); None: none yet."""
    seen = old if isinstance(old, list) else ([] if old is None else [old])
    if used is not None and used not in seen:
        seen = [*seen, used]
    return seen[0] if len(seen) == 1 else (seen or None)


def record_batch(out_dir: Path, stage: str, batch: int) -> None:
    """Add the batch size a stage now samples with to the recorded plan, so that a --resume
    with --batch-size auto computes in the same batches (floats depend on the batch size)."""
    path = Path(out_dir) / PLAN_NAME
    if not path.is_file():  # only run.json: the run is complete
        return
    recorded = read_run_plan(out_dir)
    batches = dict(recorded.get("resolved_batch_size") or {})
    if (now := batch_record(batches.get(stage), batch)) == batches.get(stage):
        return
    data = json.dumps({**recorded, "resolved_batch_size": {**batches, stage: now}}, indent=2, sort_keys=True,
                      default=str) + "\n"
    _atomic_stream(path, lambda f: f.write(data.encode()), replace=True)


def _npz_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype, chunks: Iterable[np.ndarray]) -> None:
    """One .npy member of an npz written from ``chunks`` (C order) as they come, as
    ``np.savez`` lays it out (stored, not compressed), with a fixed timestamp so that the same
    arrays give the same bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    with zf.open(info, "w", force_zip64=True) as member:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


class SampleWriter:
    """Writes per-sample PNGs as they finish and the run's summary files at the end."""

    def __init__(self, out_dir: Path, text: Mapping[str, Any]):
        self.out_dir = Path(out_dir)
        self.text = dict(text)  # run settings stored in every PNG's text chunks

    def done_indices(self) -> set[int]:
        """Indices whose PNG is already complete (for --resume)."""
        return {int(m.group(1)) for p in self.out_dir.iterdir() if (m := _PNG_RE.match(p.name))}

    def write_sample(self, index: int, image: np.ndarray, label: int) -> Path:
        path = self.out_dir / PNG_NAME.format(index)
        text = {**self.text, "index": str(index), "class": str(int(label))}
        _atomic_write(path, png_bytes(image, text))
        return path

    def write_batch(self, indices: Iterable[int], images: np.ndarray, labels: Iterable[int]) -> None:
        for k, img, lab in zip(indices, images, labels):
            self.write_sample(int(k), img, int(lab))

    def read_sample(self, index: int) -> tuple[np.ndarray, int]:
        path = self.out_dir / PNG_NAME.format(index)
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB")), int(im.text.get("class", -1))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for a truncated or altered file
            if not path.exists():
                raise
            # ours are written whole (temporary name, then rename): something else changed it
            raise OutputError(f"{path} is damaged ({str(exc) or type(exc).__name__}); delete it and rerun "
                              "with --resume to sample it again") from None

    def finalize(self, num_samples: int, run_info: Mapping[str, Any], nrow: int | None = None) -> dict[str, Path]:
        """Assemble samples.npz, grid.png (the first ``GRID_MAX`` samples) and run.json from
        the per-sample PNGs, reading them one at a time: memory stays at one image plus the
        grid, whatever the number of samples. ``arr_1`` (labels) only when the samples have
        classes, as OpenAI's sampling script writes it."""
        missing = [k for k in range(num_samples) if not (self.out_dir / PNG_NAME.format(k)).exists()]
        if missing:
            raise OutputError(f"{len(missing)} samples are missing in {self.out_dir} (first: {missing[0]}); rerun with --resume")
        first, _ = self.read_sample(0)
        labels = np.empty(num_samples, dtype=np.int64)
        shown = min(num_samples, GRID_MAX)
        grid_images = np.empty((shown, *first.shape), dtype=np.uint8)

        def images() -> Iterable[np.ndarray]:
            for k in range(num_samples):
                image, labels[k] = self.read_sample(k)
                if image.shape != first.shape:
                    raise OutputError(f"{self.out_dir / PNG_NAME.format(k)} is {image.shape[1]}x{image.shape[0]}, "
                                      f"not {first.shape[1]}x{first.shape[0]} like sample 0")
                if k < shown:
                    grid_images[k] = image
                yield image

        def write_npz(f: BinaryIO) -> None:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                _npz_member(zf, "arr_0.npy", (num_samples, *first.shape), np.uint8, images())
                if (labels >= 0).any():
                    _npz_member(zf, "arr_1.npy", (num_samples,), np.int64, [labels])

        paths = {"npz": self.out_dir / "samples.npz", "grid": self.out_dir / "grid.png", "run": self.out_dir / "run.json"}
        _atomic_stream(paths["npz"], write_npz, same_ok=True)
        grid = png_bytes(make_grid(grid_images, nrow), self.text)
        _atomic_stream(paths["grid"], lambda f: f.write(grid), same_ok=True)
        if not paths["run"].exists():  # run.json last: present means the run was complete (kept on --resume)
            _atomic_write(paths["run"], (json.dumps(run_info, indent=2, sort_keys=True, default=str) + "\n").encode())
        (self.out_dir / PLAN_NAME).unlink(missing_ok=True)  # run.json records the same plan
        return paths
