"""Resumable, verified HTTP downloads (urllib only), as huggingface_hub does them.

``download(urls, dest, ...)`` streams into a private ``<dest>.<token>.incomplete`` beside
``dest``, resumes with a Range request after a broken transfer (restarting from zero when the
server answers 200 instead of 206), retries timeouts, connection errors and 5xx with exponential
backoff, fails at once on 404 (or a missing file:// file) and on a local write error (a full
disk is no network trouble), checks the size and then the sha256 (or its known prefix), and
publishes with ``os.replace``. An interrupted download leaves ``<dest>.incomplete`` for the next
run to resume. Callers hold ``file_lock`` to avoid duplicate work; correctness never depends on
it: a partial file is only adopted after an atomic rename, only a regular file (never through a
symlink planted in a shared cache), and only a finished, verified file is ever renamed onto
``dest``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

from .errors import ChecksumError, DownloadError, OfflineError, OutputError

CHUNK = 1 << 20
TIMEOUT = 30.0  # seconds without a byte before a socket read gives up (then we retry)
RETRIES = 5  # consecutive failed attempts (no new bytes) before giving up
BACKOFF = 1.0  # first retry delay in seconds; doubled after each failure
STALE_SECONDS = 600  # a private partial file untouched this long belongs to a dead process
USER_AGENT = "adm-cli (+https://github.com/openai/guided-diffusion checkpoints)"
_NO_NETWORK = {errno.ENETUNREACH, errno.EHOSTUNREACH, getattr(errno, "ENONET", -1)}
_CANNOT_CREATE = {errno.EROFS, errno.EACCES, errno.EPERM}
# urllib's reasons that no retry can change: a file:// URL to a missing file, a folder, no access
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
# Partial files are opened without following a final symlink: in a shared cache another user
# could otherwise point <dest>.incomplete at a file of ours and have the download overwrite it.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class _Retry(Exception):
    """A transient failure: try again (after a pause)."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_matches(digest: str, expected: str | None) -> bool:
    """``expected`` is a full digest or a published prefix (mmagic's 8 hex digits); None: anything."""
    return expected is None or digest.lower().startswith(expected.lower())


@contextlib.contextmanager
def file_lock(path: Path, on_wait=None) -> Iterator[bool]:
    """An exclusive advisory lock on ``path`` (created, never deleted: deleting lock files races);
    yields whether it is held. Where the filesystem cannot lock, go on without: downloads stay
    correct, only duplicated. So too where the lock file cannot be created (a read-only or
    another user's cache): a complete cache is then only read, and a write that is still needed
    fails with its own error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno not in _CANNOT_CREATE:
            raise
        fd = None
    if fd is None:
        yield False
        return
    try:
        locked = _lock(fd, on_wait)
        try:
            yield locked
        finally:
            if locked:
                _unlock(fd)
    finally:
        os.close(fd)


def _lock(fd: int, on_wait) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                on_wait and on_wait()
                on_wait = None
                time.sleep(0.5)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        on_wait and on_wait()
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # e.g. ENOLCK on some network filesystems
        return False
    return True


def _unlock(fd: int) -> None:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
    except ImportError:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _private_partials(dest: Path) -> list[Path]:
    """Other processes' partial files of ``dest`` (``<dest>.<token>.incomplete``)."""
    return list(dest.parent.glob(f"{dest.name}.*.incomplete"))


def _regular(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISREG(path.lstat().st_mode)
    return False


def _claim_partial(dest: Path, exclusive: bool = False) -> Path:
    """A private partial file for this process, adopting (by atomic rename) what an interrupted
    run left: ``<dest>.incomplete``, or a private one nobody has touched for STALE_SECONDS (any
    private one when ``exclusive``: under the entry's lock, its writer is gone: killed, say, by
    SIGKILL). The largest goes first; a symlink is never adopted."""
    mine = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:12]}.incomplete")
    shared = dest.with_name(dest.name + ".incomplete")
    now = time.time()
    candidates = []
    for p in [shared, *_private_partials(dest)]:
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and (p == shared or exclusive or now - st.st_mtime > STALE_SECONDS):
                candidates.append((st.st_size, p))
    for _, p in sorted(candidates, key=lambda c: -c[0]):
        try:
            os.replace(p, mine)
        except OSError:
            continue  # gone already, or another process took it first
        if _regular(mine):  # swapped for a link between our look and the rename: not ours
            return mine
        mine.unlink(missing_ok=True)
    os.close(os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
    return mine


def _drop_leftovers(dest: Path) -> None:
    """Under the entry's lock, once ``dest`` is complete: other runs' partial files of it are
    waste (gigabytes, for a killed download of a real checkpoint)."""
    for p in [dest.with_name(dest.name + ".incomplete"), *_private_partials(dest)]:
        if _regular(p):
            p.unlink(missing_ok=True)


def _release_partial(part: Path, dest: Path) -> None:
    """Leave what we have under the shared resume name (if anything arrived)."""
    with contextlib.suppress(OSError):
        if part.stat().st_size:
            os.replace(part, dest.with_name(dest.name + ".incomplete"))
        else:
            part.unlink()


def _open_part(part: Path, flags: int):
    """An unbuffered file object of a partial file (never through a symlink)."""
    return open(os.open(part, flags | _NOFOLLOW, 0o644), "rb" if flags == os.O_RDONLY else "ab", buffering=0)


class _Transfer:
    """The state of one download into a partial file: bytes so far and their running sha256.
    ``size`` and ``hash`` always describe the file's own bytes: a failed write is cut back off."""

    def __init__(self, part: Path, progress):
        self.part, self.progress = part, progress
        self.hash = hashlib.sha256()
        self.size = 0
        with _open_part(part, os.O_RDONLY) as f:  # resuming: the hash must cover what is already there
            while block := f.read(CHUNK):
                self.hash.update(block)
                self.size += len(block)
        self.total: int | None = None

    def restart(self) -> None:
        self.hash, self.size = hashlib.sha256(), 0
        with _open_part(self.part, os.O_WRONLY | os.O_TRUNC):
            pass

    def fetch(self, url: str) -> None:
        """One HTTP attempt, from ``self.size`` on. Raises _Retry on transient failures."""
        headers = {"User-Agent": USER_AGENT}
        if self.size:
            headers["Range"] = f"bytes={self.size}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            if self._already_complete(exc):
                return
            self._http_error(url, exc)
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, socket.gaierror) or getattr(reason, "errno", None) in _NO_NETWORK:
                raise OfflineError(f"cannot reach {url} ({reason}): no network? Use --mirror BASE, "
                                   "or fetch where there is network") from None
            if isinstance(reason, (str, *_PERMANENT)):  # str: "unknown url type" and the like
                raise DownloadError(f"{url}: {getattr(reason, 'strerror', None) or reason}") from None
            raise _Retry(f"{url}: {reason}") from None
        except ValueError as exc:  # urllib's "unknown url type" for a URL without a scheme
            raise DownloadError(f"{url}: {exc}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retry(f"{url}: {exc or type(exc).__name__}") from None
        with resp:
            self._start(url, resp)
            self._stream(url, resp)

    def _already_complete(self, exc: urllib.error.HTTPError) -> bool:
        """416 with ``bytes */N`` where N is what we hold: an earlier run got every byte."""
        m = re.match(r"bytes \*/(\d+)$", exc.headers.get("Content-Range", "") if exc.headers else "")
        if exc.code == 416 and m and int(m.group(1)) == self.size:
            exc.close()
            self.total = self.size
            return True
        return False

    def _http_error(self, url: str, exc: urllib.error.HTTPError):
        exc.close()
        if exc.code == 416 and self.size:  # our partial is no prefix of this file: start over
            self.restart()
            raise _Retry(f"{url}: HTTP 416, restarting from zero")
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retry(f"{url}: HTTP {exc.code} {exc.reason}")
        raise DownloadError(f"HTTP {exc.code} {exc.reason}: {url}")

    def _start(self, url: str, resp) -> None:
        status = getattr(resp, "status", None)
        length = resp.headers.get("Content-Length")
        if self.size and status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != self.size:
                raise DownloadError(f"{url}: asked for bytes from {self.size}, the server sent "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}")
            self.total = int(m.group(3)) if m.group(3) != "*" else None
        else:  # 200 (no Range support, or a fresh start; file:// has no status): from zero
            if self.size:
                self.restart()
            self.total = _content_length(length)
        self.progress.start(self.size, self.total)

    def _stream(self, url: str, resp) -> None:
        with _open_part(self.part, os.O_WRONLY | os.O_APPEND) as f:
            while True:
                try:
                    block = resp.read(CHUNK)
                except http.client.IncompleteRead as exc:  # newer Pythons raise where older return short
                    raise _Retry(f"{url}: connection broke after {self.size} bytes") from exc
                except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
                    raise _Retry(f"{url}: {exc or type(exc).__name__} after {self.size} bytes") from None
                if not block:
                    break
                self._write(f, block)
        if self.total is not None and self.size < self.total:
            raise _Retry(f"{url}: connection closed after {self.size} of {self.total} bytes")

    def _write(self, f, block: bytes) -> None:
        """Append ``block`` whole, or cut the file back to ``size`` and fail at once: a full disk
        or a lost mount is no network trouble that a retry would mend, and bytes half-written
        must not stay behind what a resumed request appends."""
        try:
            view = memoryview(block)
            while view:
                view = view[f.write(view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(f.fileno(), self.size)
            raise OutputError(f"cannot write to {self.part.parent}: {exc.strerror or exc} (the {self.size:,} "
                              "bytes downloaded are kept for the next run to resume from)") from None
        self.hash.update(block)
        self.size += len(block)
        self.progress.advance(len(block))


def _content_length(value: str | None) -> int | None:
    """The body's length from a Content-Length header, None where it is absent or unusable (the
    stream then runs to its end). A list of one repeated value counts (RFC 9110, 8.6)."""
    if value is None:
        return None
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        return None
    (v,) = values
    return int(v) if v.isdigit() else None


def download(urls: list[str], dest: Path, *, sha256: str | None = None, size: int | None = None,
             progress=None, exclusive: bool = False) -> str:
    """Fetch the first URL that answers into ``dest`` (atomically); returns the full sha256.

    ``sha256`` may be a full digest or a prefix. On a size or checksum mismatch the download is
    deleted and ChecksumError says what was expected and what arrived. ``exclusive``: the caller
    holds the entry's lock, so any other partial file of ``dest`` is a dead run's (resumed from,
    and removed once ``dest`` is complete).
    """
    progress = progress or NullProgress()
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        part = _claim_partial(dest, exclusive)
        try:
            transfer = _Transfer(part, progress)
            _with_retries(transfer, url)
        except DownloadError as exc:
            _release_partial(part, dest)
            if isinstance(exc, OfflineError):
                raise
            errors.append(str(exc))
            continue
        except BaseException:
            _release_partial(part, dest)
            raise
        finally:
            progress.stop()
        digest = _verify(transfer, part, dest.name, sha256, size)
        os.replace(part, dest)
        if exclusive:
            _drop_leftovers(dest)
        return digest
    raise DownloadError("; ".join(errors) if errors else f"no URL to fetch {dest.name} from")


def _with_retries(transfer: _Transfer, url: str) -> None:
    failures = 0
    while True:
        before = transfer.size
        try:
            transfer.fetch(url)
            return
        except _Retry as exc:
            failures = 0 if transfer.size > before else failures + 1  # progress resets the count
            if failures > RETRIES:
                raise DownloadError(f"giving up after {RETRIES} retries: {exc}") from None
            if failures:
                delay = BACKOFF * 2 ** (failures - 1)
                # said, not silent: the pauses add up to half a minute before the run gives up
                transfer.progress.note(f"{exc}; retry {failures} of {RETRIES} in {delay:g} s")
                time.sleep(delay)


def _verify(transfer: _Transfer, part: Path, name: str, sha256: str | None, size: int | None) -> str:
    want = size if size is not None else transfer.total
    if part.stat().st_size != transfer.size:  # the hash covers what we meant to write, not what is there
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{name}: the partial file changed while it was written (download deleted)")
    if want is not None and transfer.size != want:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{name}: expected {want:,} bytes, got {transfer.size:,} (download deleted)")
    digest = transfer.hash.hexdigest()
    if not sha256_matches(digest, sha256):
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{name}: expected sha256 {sha256}, got {digest} (download deleted)")
    return digest


class NullProgress:
    def start(self, done: int, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class RichProgress(NullProgress):
    """A rich progress bar for one file: bytes, rate, ETA (on stderr)."""

    def __init__(self, label: str):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self._task = self._bar.add_task(label, total=None, start=False)
        self._running = False

    def start(self, done: int, total: int | None) -> None:
        if not self._running:
            self._bar.start()
            self._running = True
        self._bar.update(self._task, completed=done, total=total)
        self._bar.start_task(self._task)

    def advance(self, n: int) -> None:
        self._bar.advance(self._task, n)

    def note(self, message: str) -> None:
        self._bar.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self._running:
            self._bar.stop()
            self._running = False
