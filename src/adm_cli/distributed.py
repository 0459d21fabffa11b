"""Several processes, one run: `adm sample` under torchrun.

torchrun starts one process ("rank") per device and describes the run in environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). ``join`` turns them into a ``Group``,
or a ``Solo`` outside torchrun. ``runner.execute`` makes the same few calls on either, so one
process and many run the same code.

Sharing the work. Image k depends only on (seed, k) (noise.py), so the run is split by batch:
runner cuts the indices still to do into blocks of B consecutive indices (the batches a single
process would sample, see runner._blocks) and rank r samples blocks r, r + W, r + 2W, ...
Interleaved, so ranks get equal shares and an interrupted run leaves close to a prefix done.
Rank 0 alone touches the output folder: it records the plan, lists finished samples, receives
every rank's finished batches and writes them, and assembles samples.npz at the end. The folder
need not be shared between machines, and no file depends on the number of processes.

Ending a failed run. Ranks meet only at exchanges: an all-gather of a short status, then (while
sampling) a gather of finished batches to rank 0. An exception in one rank is not raised at once:
the rank takes its one-line message to the next exchange, so every rank stops and rank 0 prints
which rank failed and why. A rank that dies closes its sockets, which the others notice at their
next exchange; a rank that hangs is given up after ADM_DIST_TIMEOUT seconds, the process-group
timeout (default 1800: the longest legitimate wait is one batch, or the first process on a
machine fetching weights while the others wait). torchrun also stops the other ranks (SIGTERM)
when one exits with an error; that ends them with a one-line error too.

Backends: gloo on CPU, "cpu:gloo,cuda:nccl" on GPUs. All that is exchanged here is small CPU
data (statuses, uint8 images), which PyTorch routes through gloo, so every wait honours the
timeout; NCCL is there for CUDA tensors (none are exchanged today).
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import sys
import traceback
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .errors import AdmError, DistributedError, UsageError


def _debug() -> bool:
    from .cli import debug  # (imported late: cli imports this module)

    return debug()

DEFAULT_TIMEOUT_S = 1800.0
_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerError(DistributedError):
    """A failure every rank has learnt of at an exchange. Only rank 0 prints it
    (``rank0_prints``), so the error appears once, not once per process."""

    rank0_prints = True


class Stopped(DistributedError):
    """The launcher ended this process (torchrun sends SIGTERM to all when one rank failed)."""

    rank0_prints = True


def silent_here(team: "Solo", exc: BaseException) -> bool:
    """Whether this process should exit without printing ``exc`` (rank 0 prints it)."""
    return not team.is_root and (getattr(exc, "rank0_prints", False) or isinstance(exc, KeyboardInterrupt))


def timeout_s() -> float:
    raw = os.environ.get("ADM_DIST_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_TIMEOUT_S:  # (NaN fails too; inf cannot be a timedelta)
        raise UsageError(f"ADM_DIST_TIMEOUT must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {raw!r}")
    return value


MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _env_int(name: str, default: int | None = None) -> int:
    """A launcher variable (RANK, WORLD_SIZE, LOCAL_RANK) as a non-negative integer."""
    raw = os.environ.get(name, "").strip()
    if not raw and default is not None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise UsageError(f"{name} must be a non-negative integer (torchrun sets it), got {raw!r}")
    return int(raw)


def _line(exc: BaseException) -> str:
    """One line for an exception; a bug (not an AdmError) keeps its type name."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, AdmError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _short(exc: BaseException) -> str:
    """The gist of a gloo / TCPStore error: drop the source location and the advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0].rstrip(".")[:200]


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run ``fn``, keeping an ordinary failure to report at the next exchange. Losing contact
    (or being stopped) is raised at once: there is nobody left to exchange with."""
    try:
        return fn(), None
    except DistributedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
        if _debug():
            traceback.print_exc()
        return None, exc


def _flat(blocks: Sequence[list[int]]) -> list[int]:
    return [k for block in blocks for k in block]


def launch_says_not_root() -> bool:
    """Whether the launcher made this process a rank other than 0 (RANK > 0): one whose copy of
    an error every process meets alike (a bad ADM_DIST_TIMEOUT) is left to rank 0 to print."""
    raw = os.environ.get("RANK", "").strip()
    return raw.isascii() and raw.isdigit() and int(raw) > 0


def _everywhere(exc: AdmError) -> AdmError:
    exc.rank0_prints = True  # the same settings give every process this error
    return exc


def join(device: str = "auto") -> "Solo | Group":
    """This run's processes: a ``Group`` under torchrun (WORLD_SIZE > 1), else ``Solo``.
    Errors in settings that every process shares are marked ``rank0_prints``."""
    try:
        world = _env_int("WORLD_SIZE", 1)
    except UsageError as exc:
        raise _everywhere(exc) from None
    if world <= 1:
        return Solo()
    missing = [k for k in _REQUIRED_ENV if not os.environ.get(k)]
    if missing:
        raise _everywhere(DistributedError(f"WORLD_SIZE > 1 but {', '.join(missing)} is not set: "
                                           "start the run with torchrun"))
    rank = _env_int("RANK")
    if rank >= world:
        raise UsageError(f"RANK {rank} is not below WORLD_SIZE {world}")
    local = _env_int("LOCAL_RANK", rank)
    try:
        timeout = timeout_s()
    except UsageError as exc:
        raise _everywhere(exc) from None
    gpu = device not in ("cpu", "mps") and torch.cuda.is_available()
    if gpu and local < torch.cuda.device_count():
        torch.cuda.set_device(local)  # before the group exists, as NCCL wants (Group.device checks the count)
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - store / rendezvous errors have many types
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistributedError(f"rank {rank} could not join the run at {where} within {timeout:g} s "
                               f"({_short(exc)})") from None
    return Group(rank, world, local, timeout)


class Solo:
    """One process does everything: what ``runner.execute`` asks of a team, done locally."""

    rank = 0
    world_size = 1
    local_rank = 0
    is_root = True

    def __enter__(self) -> "Solo":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def plan(self, request):
        from .runner import plan_run

        return plan_run(request)

    def from_root(self, fn: Callable[[], Any], what: str) -> Any:
        """Rank 0 runs ``fn``; every rank gets its value (or its error)."""
        return fn()

    def agree(self, fn: Callable[[], Any], what: str, staggered: bool = False) -> Any:
        """Every rank runs ``fn``; if one fails, every rank raises."""
        return fn()

    def least(self, value: int) -> int:
        """The smallest of every rank's ``value`` (one batch size for all)."""
        return value

    def split(self, blocks: Sequence[list[int]]) -> list[list[int]]:
        """This rank's share of the batches ``blocks``."""
        return list(blocks)

    def rows(self, blocks: Sequence[list[int]], read: Callable[[list[int]], Any]) -> Any:
        """``read(indices)`` for the indices of this rank's share of ``blocks``, read by rank 0."""
        return read(_flat(self.split(blocks)))

    def sample(self, generate: Callable | None, write: Callable, progress: Callable | None, steps: int) -> None:
        """``generate(on_batch, progress)`` samples this rank's share (None: it has none);
        ``write(indices, images, labels)`` stores a finished batch, on rank 0."""
        if generate is not None:
            generate(lambda b: write(b.indices, b.images, b.labels), progress)

    def leave(self, code: int = 0) -> None:
        """Called when the run has finished (``code`` 0), or failed in another rank: nothing to
        do in one process."""
        if code:
            raise SystemExit(code)


class Group(Solo):
    """The ranks of a torchrun run (the process group is already initialised)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, timeout: float):
        self.rank, self.world_size, self.local_rank, self.timeout = rank, world_size, local_rank, timeout
        self.is_root = rank == 0
        self._working = world_size
        self._old_sigterm: Any = None

    def __enter__(self) -> "Group":
        try:  # a clean one-line exit when torchrun stops us because another rank failed
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: keep the default (silent) exit
            self._old_sigterm = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        try:
            if exc[0] is None:
                # Tear down together, so that no rank destroys its group while another still
                # sends to it. (This did not stop the rare abort at interpreter exit; see leave.)
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group may be broken by the failure being reported
            pass

    def leave(self, code: int = 0) -> None:
        """End this rank's process now with ``code``, without Python's and the C++ libraries'
        exit teardown: when the run has finished, or when another rank's failure ended it (rank
        0 reports it; ``code`` != 0). Why: in CI a rank aborted during that teardown (SIGABRT,
        "terminate called without an active exception" from a native thread) after the run had
        finished, its group was destroyed and its last line printed, and torchrun then reported
        the whole run as failed; session 17's CI saw the same on the failure path. By now every
        output file is closed and renamed into place, so skipping the teardown loses nothing;
        only the standard streams need flushing."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken pipe must not stop the exit
                pass
        os._exit(code)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        raise Stopped(f"rank {self.rank} stopped by the launcher (another process of the run failed "
                      "or was interrupted)")

    def device(self, name: str) -> str:
        """Each rank on its own GPU: "auto" / "cuda" become cuda:LOCAL_RANK."""
        from .runner import pick_device

        device = pick_device(name)
        if device == "cuda":
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise UsageError(f"this machine has {count} GPU(s) but torchrun started more processes on it; "
                                 f"use --nproc-per-node {count}")
            device = f"cuda:{self.local_rank}"
        if device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))
        return device

    def plan(self, request):
        """Rank 0 fixes the seed (given, recorded by the run being resumed, or drawn) and the
        classes; every rank then plans that run on its own device, and all plans must agree."""
        from .outputs import plan_difference
        from .runner import plan_run, resolve_request

        def fixed():
            resolved = resolve_request(request)
            return resolved.seed, resolved.classes, resolved.cuda_graph

        # What each process was given, before rank 0's seed and classes replace it: a rank
        # started with another --seed (or batch, grid, ...) must not be quietly overruled.
        given = {"--seed": request.seed, "--class": request.classes, "--batch-size": request.batch_size,
                 "--nrow": request.nrow, "--compile": request.compile, "--cuda-graph": request.cuda_graph}
        everyone = self._all_gather(given)
        for r, theirs in enumerate(everyone):
            for flag, value in theirs.items():
                if value != everyone[0][flag]:
                    raise PeerError(f"rank {r} was started with {flag} {value!r} but rank 0 with "
                                    f"{everyone[0][flag]!r}; give every process the same command")
        seed, classes, graph = self.from_root(fixed, "reading the output folder")
        # Only rank 0 reads the output folder (it need not be shared between machines).
        request = replace(request, seed=seed, classes=classes, cuda_graph=graph,
                          resume=request.resume and self.is_root)
        # The first process on each machine plans first (fetching or converting weights into
        # the cache once); the others then find them there.
        plan = self.agree(lambda: plan_run(replace(request, device=self.device(request.device))),
                          "planning the run", staggered=True)
        infos = self._all_gather(plan.describe())
        for r, info in enumerate(infos):
            diff = plan_difference(infos[0], info)
            if diff is not None:
                key, root_value, value = diff
                raise PeerError(f"rank {r} was started with {key} = {value!r} but rank 0 with {root_value!r}; "
                                "give every process the same command")
        return plan

    # -- exchanges ---------------------------------------------------------------------------

    def _call(self, op: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return op(*args, **kwargs)
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError / DistBackendError
            raise DistributedError(
                f"rank {self.rank} lost contact with the other processes of the run ({_short(exc)}): one of them "
                f"crashed, was killed, or did not answer within ADM_DIST_TIMEOUT={self.timeout:g} s") from None

    def _all_gather(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        self._call(dist.all_gather_object, out, obj)
        return out

    def _raise_first(self, lines: list[str | None], error: BaseException | None, what: str) -> None:
        failed = [(r, line) for r, line in enumerate(lines) if line is not None]
        if not failed:
            return
        if self.is_root and error is not None:
            raise error  # rank 0's own error, reported exactly as one process would report it
        rank, line = failed[0]
        raise PeerError(f"rank {rank} failed while {what}: {line}")

    def _settle(self, error: BaseException | None, what: str) -> None:
        """The status exchange: every rank says whether its part of ``what`` failed."""
        self._raise_first(self._all_gather(None if error is None else _line(error)), error, what)

    def from_root(self, fn: Callable[[], Any], what: str) -> Any:
        value, error = _attempt(fn) if self.is_root else (None, None)
        box = [(value, None if error is None else _line(error))]  # one broadcast: value or error
        self._call(dist.broadcast_object_list, box, src=0)
        value, line = box[0]
        self._raise_first([line], error, what)
        return value

    def agree(self, fn: Callable[[], Any], what: str, staggered: bool = False) -> Any:
        turns = [self.local_rank == 0, self.local_rank != 0] if staggered else [True]
        value, error = None, None
        for my_turn in turns:
            if my_turn:
                value, error = _attempt(fn)
            self._settle(error, what)
        return value

    def least(self, value: int) -> int:
        return min(self._all_gather(value))

    def split(self, blocks: Sequence[list[int]]) -> list[list[int]]:
        self._working = min(self.world_size, len(blocks))  # ranks with a share: rank 0's progress scale
        return list(blocks)[self.rank::self.world_size]

    def rows(self, blocks: Sequence[list[int]], read: Callable[[list[int]], Any]) -> Any:
        parts, error = None, None
        if self.is_root:
            shares = [_flat(list(blocks)[r::self.world_size]) for r in range(self.world_size)]
            parts, error = _attempt(lambda: [read(share) for share in shares])
        self._settle(error, "reading the base samples")
        box: list = [None]
        self._call(dist.scatter_object_list, box, parts, src=0)
        return box[0]

    def sample(self, generate: Callable | None, write: Callable, progress: Callable | None, steps: int) -> None:
        """In rounds: a rank takes part in one exchange per batch it finishes, then in empty
        ones until every rank is done; rank 0 writes each round's batches."""
        tally = _Tally(progress if self.is_root else None, steps, self._working)
        try:
            if generate is not None:
                generate(lambda b: self._round(b, write, tally), tally.live)
            while not self._round(None, write, tally):
                pass
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - take it to the others, then everyone raises
            if _debug():
                traceback.print_exc()
            self._round(None, write, tally, error=exc)
            raise

    def _round(self, batch: Any, write: Callable, tally: "_Tally", error: BaseException | None = None) -> bool:
        """One exchange; True when every rank is done."""
        state = "error" if error is not None else ("batch" if batch is not None else "done")
        statuses = self._all_gather((state, None if error is None else _line(error)))
        self._raise_first([line if s == "error" else None for s, line in statuses], error, "sampling")
        if all(s == "done" for s, _ in statuses):
            return True
        payload = None if batch is None else ([int(k) for k in batch.indices], batch.images,
                                               [int(v) for v in batch.labels])
        gathered: list | None = [None] * self.world_size if self.is_root else None
        self._call(dist.gather_object, payload, gathered, dst=0)
        if self.is_root:
            for part in gathered:
                if part is not None:
                    write(*part)
            tally.arrived(sum(len(p[0]) for p in gathered if p), sum(s == "batch" for s, _ in statuses))
        return False


class _Tally:
    """Rank 0's progress over the whole run. Live, its own sample-steps times the number of
    ranks working (they run in step); exact whenever a round's batches arrive."""

    def __init__(self, report: Callable | None, steps: int, working: int):
        self.report, self.steps, self.scale = report, steps, max(1, working)
        self.shown = 0.0
        self.exact = 0

    def live(self, n: int) -> None:
        if self.report is not None:
            self.report(n * self.scale)
            self.shown += n * self.scale

    def arrived(self, samples: int, working: int) -> None:
        self.exact += samples * self.steps
        if self.report is not None:
            self.report(self.exact - self.shown)
            self.shown = self.exact
        self.scale = max(1, working)
