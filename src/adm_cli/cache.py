"""The weights cache: how a registry name (or a checkpoint path) becomes a canonical file.

Layout under ``cache_root()`` (``ADM_HOME``, else the platform's user cache folder):

    <name>/<published file>          as downloaded, verified (download.py)
    <name>/<published file>.json     its sha256 and size: checked on every later use; where no
                                     checksum is published, the first download's is the reference
                                     once that file has loaded as a checkpoint ("loaded")
    <name>/<role>.safetensors        the canonical conversion, one per network (convert.py)
    <name>/<role>.safetensors.json   its sha256 and size when written (a damaged one is redone)
    <name>/.lock                     held while fetching or converting that entry
    converted/<key>/<role>.safetensors   conversions of files given by path (``--weights x.pt``),
    converted/<key>/roles.json           written once all of them are
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .download import NullProgress, RichProgress, download, file_lock, sha256_file, sha256_matches
from .environment import env_switch
from .errors import ChecksumError, ConversionError, OfflineError, UsageError, WeightsError
from .flags import conversion_args
from .metadata import read_metadata
from .registry import Entry, load_registry

# convert and safe_load (torch) are imported where a file is converted or read: `adm models`, `adm
# fetch` of a converted model and the cache's checks run without torch.

def cache_root() -> Path:
    """``ADM_HOME``, else ~/.cache/adm-cli (XDG_CACHE_HOME honoured), ~/Library/Caches/adm-cli
    on macOS, %LOCALAPPDATA%\\adm-cli\\Cache on Windows."""
    if os.environ.get("ADM_HOME"):
        return Path(os.environ["ADM_HOME"]).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "adm-cli" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "adm-cli"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "adm-cli"


def entry_dir(entry: Entry) -> Path:
    return cache_root() / entry.name


def raw_path(entry: Entry) -> Path:
    return entry_dir(entry) / entry.filename


def converted_path(entry: Entry, role: str) -> Path:
    return entry_dir(entry) / f"{entry.role(role)}.safetensors"


def offline_requested(offline: bool = False) -> bool:
    """--offline, or ADM_OFFLINE set to a true value (one reading for every command)."""
    return env_switch("ADM_OFFLINE", default=False) or offline


def urls_for(entry: Entry, mirror: str | None = None) -> list[str]:
    """The entry's URLs, or BASE + file name with ``--mirror BASE`` / ``ADM_MIRROR``."""
    mirror = mirror or os.environ.get("ADM_MIRROR") or None
    if mirror:
        return [_mirror_base(mirror) + "/" + entry.filename]
    return list(entry.urls)


def _mirror_base(mirror: str) -> str:
    """A mirror URL without its trailing slash; an existing local folder becomes a file:// URL."""
    try:
        parts = urllib.parse.urlsplit(mirror)
        parts.port  # noqa: B018 - parsed on access: a port that is no number raises here
    except ValueError as exc:  # "http://[bad", "http://host:x/"
        raise UsageError(f"--mirror {mirror!r} is not a usable URL ({exc})") from None
    if parts.scheme.lower() in ("http", "https", "file"):
        return mirror.rstrip("/")
    folder = Path(mirror).expanduser()  # also C:\mirror, whose "scheme" urllib reads as "c"
    if folder.is_dir():
        return folder.resolve().as_uri()
    raise UsageError(f"--mirror {mirror!r} is neither an http(s):// or file:// URL nor an existing folder")


@dataclass(frozen=True)
class CacheStatus:
    fetched: bool  # the published file is in the cache (or, bundled: shipped)
    converted: bool  # every network is converted and current (or, bundled: shipped)


def cache_status(entry: Entry) -> CacheStatus:
    if entry.bundled:
        present = entry.bundled_path().is_file()
        return CacheStatus(present, present)
    return CacheStatus(raw_path(entry).is_file(), all(_is_current(entry, r) for r in entry.roles))


def _is_current(entry: Entry, role: str, *, rehash: bool = False) -> bool:
    """A converted file that this registry entry would write again (a registry update that
    changes an architecture makes older conversions stale) and that still has the bytes it was
    written with: hashed again when its size or mtime changed since (or with ``rehash``), against
    the sha256 recorded beside it. A damaged one is then not current, so it is converted again
    from the verified download rather than sampled from."""
    path = converted_path(entry, role)
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except WeightsError:
        return False
    cfg = entry.config_for(role)
    if not (meta.get("adm_registry_name") == entry.name
            and meta.get("adm_config") == json.dumps(cfg.to_dict(), sort_keys=True)):
        return False
    return _as_written(path, rehash=rehash)


def _as_written(path: Path, *, rehash: bool = False) -> bool:
    """A converted file still holds the bytes it was written with: hashed again against the
    sha256 recorded beside it when its size or mtime changed (or with ``rehash``). One written by
    an older release has no record: nothing to check it against."""
    record = _read_record(path)
    if not record.get("sha256"):
        return True
    st = path.stat()
    if not rehash and record.get("verified_stat") == [st.st_size, st.st_mtime_ns]:
        return True
    if sha256_file(path) != record["sha256"]:
        return False
    with contextlib.suppress(OSError):  # intact (say, copied): not hashed again on every later use
        _write_record(path, record["sha256"], False, record.get("source"), loaded=True)
    return True


def _record_written(paths: Iterable[Path], source: str) -> None:
    """Record each converted file's sha256, for ``_as_written`` to check it against later."""
    for path in paths:
        _write_record(path, sha256_file(path), False, source, loaded=True)


# -- the published file ------------------------------------------------------------------------


def _record_path(raw: Path) -> Path:
    return raw.with_name(raw.name + ".json")


def _read_record(raw: Path) -> dict[str, Any]:
    try:
        data = json.loads(_record_path(raw).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(raw: Path, digest: str, published: bool, source: str | None, loaded: bool = False) -> None:
    st = raw.stat()
    record = {"sha256": digest, "size": st.st_size, "published_checksum": published,
              "source": source, "verified_stat": [st.st_size, st.st_mtime_ns], "loaded": loaded}
    _write_json(_record_path(raw), record)


def _write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically. A temporary name of its own per writer (threads
    of one process included): a shared one would let one writer's rename take the other's file
    away mid-write."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _expected_sha(entry: Entry, raw: Path) -> tuple[str | None, bool]:
    """(expected sha256 or prefix, whether it was published) for this entry's file."""
    if entry.sha256:
        return entry.sha256, True
    record = _read_record(raw)
    # Unpublished: the first download is the reference, but only once it has loaded as a
    # checkpoint. An HTML error page or a cut-short body must never become the reference.
    return (record.get("sha256") if record.get("loaded") else None), False


def _cached_digest(entry: Entry, raw: Path) -> str | None:
    """The sha256 of the cached file if it is what we expect; None if it is not."""
    st = raw.stat()
    if entry.size is not None and st.st_size != entry.size:
        return None
    record = _read_record(raw)
    expected, published = _expected_sha(entry, raw)
    unchanged = record.get("verified_stat") == [st.st_size, st.st_mtime_ns]
    if unchanged and sha256_matches(record.get("sha256", ""), expected):
        return record["sha256"]  # not touched since we last hashed it: skip re-reading gigabytes
    digest = sha256_file(raw)
    if not sha256_matches(digest, expected):
        return None
    with contextlib.suppress(OSError):  # only saves hashing it again; a read-only cache is fine
        _write_record(raw, digest, published, record.get("source"), bool(record.get("loaded")))
    return digest


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _offline_error(*entries: Entry) -> OfflineError:
    names = [e.name for e in entries]
    where = entry_dir(entries[0]) if len(entries) == 1 else cache_root()
    return OfflineError(f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not in the cache ({where}) and "
                        f"downloads are off (--offline / ADM_OFFLINE): run `adm fetch {' '.join(names)}` with "
                        "network access")


def check_fetchable(names: Iterable[str], *, offline: bool = False, mirror: str | None = None) -> None:
    """Refuse at once what fetching ``names`` would refuse before its first byte: with downloads
    off, every entry that has neither its published file nor its converted files in the cache,
    all named (rather than the first only); a --mirror / ADM_MIRROR that is no URL or folder,
    where an entry must be downloaded. Only the files' presence is looked at (``ensure_weights``
    checks what is there when it is used), so `adm sample` runs this before it imports torch."""
    registry = load_registry()
    missing = [e for e in map(registry.get, dict.fromkeys(names)) if not e.bundled and not raw_path(e).is_file()
               and not all(converted_path(e, role).is_file() for role in e.roles)]
    if missing and offline_requested(offline):
        raise _offline_error(*missing)
    if missing:
        urls_for(missing[0], mirror)


def fetch_entry(entry: Entry, *, offline: bool = False, mirror: str | None = None,
                quiet: bool = False) -> tuple[Path, str]:
    """The verified published file of ``entry`` in the cache (downloaded if needed) and its sha256."""
    if entry.bundled:
        raise WeightsError(f"{entry.name} is bundled with adm-cli: there is nothing to fetch")
    raw = raw_path(entry)
    offline = offline_requested(offline)
    if offline and not raw.is_file():
        raise _offline_error(entry)  # before the lock: an offline miss leaves no trace in the cache
    if not raw.is_file():
        urls_for(entry, mirror)  # and neither does a --mirror that is no URL or folder
    wait = lambda: _say(f"waiting for another process fetching {entry.name} ...", quiet)  # noqa: E731
    with file_lock(entry_dir(entry) / ".lock", on_wait=wait) as held:
        if raw.is_file():  # verified again: it may have changed since (or been fetched meanwhile)
            digest = _cached_digest(entry, raw)
            if digest:
                return raw, digest
            if offline:
                raise ChecksumError(f"the cached {raw} does not match its sha256; delete it and run "
                                    f"`adm fetch {entry.name}` with network access")
            _say(f"the cached {raw.name} does not match its sha256: fetching it again", quiet)
            raw.unlink()
        if offline:
            raise _offline_error(entry)
        return raw, _download_entry(entry, raw, mirror, quiet, held)


def _download_entry(entry: Entry, raw: Path, mirror: str | None, quiet: bool, exclusive: bool) -> str:
    expected, published = _expected_sha(entry, raw)
    urls = urls_for(entry, mirror)
    progress = NullProgress() if quiet else RichProgress(entry.name)
    try:
        digest = download(urls, raw, sha256=expected, size=entry.size, progress=progress, exclusive=exclusive)
    except ChecksumError as exc:
        if expected and not published:
            raise ChecksumError(f"{exc}; the expected sha256 was recorded at the first download "
                                f"(delete {_record_path(raw)} to accept the new file)") from None
        raise
    # Matching a reference (unpublished: one that loaded) means the same bytes: loaded too.
    _write_record(raw, digest, published, urls[0], loaded=bool(expected) and not published)
    return digest


@contextlib.contextmanager
def _first_use(entry: Entry, raw: Path, digest: str) -> Iterator[bool]:
    """Around reading the cached file as a checkpoint; yields whether its sha256 is still on
    probation (no published checksum, and it has never loaded). Such a file that fails to load
    or convert is removed with its record, so the next run downloads it again; one that loads
    becomes the reference its later uses are checked against. Call under the entry's lock."""
    record = _read_record(raw)
    if entry.sha256 or record.get("loaded"):
        yield False
        return
    try:
        yield True
    except ConversionError as exc:
        raw.unlink(missing_ok=True)
        _record_path(raw).unlink(missing_ok=True)
        raise ConversionError(f"{entry.name}: the download was not a valid checkpoint and was removed "
                              f"({exc}); run `adm fetch {entry.name}` to download it again") from None
    with contextlib.suppress(OSError):  # a read-only cache stays on probation; nothing is lost
        _write_record(raw, digest, False, record.get("source"), loaded=True)


def check_fetched(entry: Entry, raw: Path, digest: str) -> None:
    """Load a file on probation (see ``_first_use``) as a checkpoint, as a conversion would:
    for ``adm fetch --no-convert``, which otherwise would never read it."""
    with file_lock(entry_dir(entry) / ".lock"), _first_use(entry, raw, digest) as probation:
        if probation:
            from .convert import read_networks
            from .safe_load import load_checkpoint

            read_networks(load_checkpoint(raw), raw.name)


def convert_entry(entry: Entry, raw: Path, digest: str, *, quiet: bool = False) -> dict[str, Path]:
    """Write the canonical file of every network in ``entry`` (under the entry's lock); a no-op
    when they are current."""
    outputs = {role: converted_path(entry, role) for role in entry.roles}
    if all(_is_current(entry, role) for role in entry.roles):
        return outputs  # without reading the (gigabytes of) checkpoint again
    with file_lock(entry_dir(entry) / ".lock"):
        for role, path in outputs.items():
            if path.exists() and not _is_current(entry, role):
                path.unlink()  # written from an older registry: redo
        from .convert import convert_checkpoint

        with _first_use(entry, raw, digest):
            written = convert_checkpoint(raw, name=entry.name, source_sha256=digest, outputs=outputs,
                                         log=None if quiet else (lambda m: _say(m, False)))
        _record_written(written.values(), raw.name)
        return written


def verify_converted(entry: Entry, *, quiet: bool = False) -> bool:
    """``adm fetch``'s check of an entry's converted files: each hashed again against the sha256
    recorded when it was written. One that is damaged (or stale) is removed, for the caller to
    convert again; returns whether all were intact."""
    intact = True
    with file_lock(entry_dir(entry) / ".lock"):
        for role in entry.roles:
            path = converted_path(entry, role)
            if not _is_current(entry, role, rehash=True):
                if path.is_file():
                    _say(f"{path} does not match what was written: converting it again", quiet)
                    path.unlink()
                intact = False
    return intact


def ensure_weights(name: str, role: str = "unet", *, offline: bool = False, mirror: str | None = None,
                   quiet: bool = False) -> Path:
    """The canonical safetensors of ``role`` in registry entry ``name``: fetched and converted
    first if needed; a bundled entry's file as shipped. For a one-network entry (a classifier)
    the default role means that network."""
    entry = load_registry().get(name)
    role = entry.role(role)
    if entry.bundled:
        path = entry.bundled_path()
        if not path.is_file():
            raise WeightsError(f"{entry.name}: the bundled file {entry.path} is missing from this "
                               "installation")
        return path
    if _is_current(entry, role):
        return converted_path(entry, role)
    raw, digest = fetch_entry(entry, offline=offline, mirror=mirror, quiet=quiet)
    return convert_entry(entry, raw, digest, quiet=quiet)[role]


# -- files given by path -------------------------------------------------------------------------


def _conversion_key(path: Path, arch: Any, config: Any) -> str:
    """Identifies (file version, architecture choice) without hashing the whole file."""
    st = path.stat()
    if isinstance(config, (str, os.PathLike)):
        config = hashlib.sha256(Path(config).read_bytes()).hexdigest()
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    arch = [arch] if isinstance(arch, str) else list(arch or ())
    text = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, arch, config], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _pick_role(files: dict[str, Path], role: str | None, path: Path) -> Path:
    if role in files:
        return files[role]
    if role is None and len(files) == 1:
        return next(iter(files.values()))
    if role is None and "unet" in files:
        return files["unet"]
    raise WeightsError(f"{path.name} holds {' and '.join(files)}, not a {role}")


def ensure_converted_file(path: str | Path, *, arch: str | Sequence[str] | None = None, config: Any = None,
                          role: str | None = None, quiet: bool = False) -> Path:
    """A checkpoint given by path as a canonical file: itself if it already is one, else its
    conversion, made once into the cache. ``role`` picks a network of a two-network file
    (default: the U-Net)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors" and "adm_config" in read_metadata(path) and not (arch or config):
        return path
    # a bad --arch or --config, or a file that is no checkpoint: refused before the cache is touched
    conversion_args(path, arch, config, "float32")
    folder = cache_root() / "converted" / _conversion_key(path, arch, config)
    done = folder / "roles.json"  # written last: a run killed between two networks' files redoes both
    with file_lock(folder / ".lock"):
        files = {p.name.removesuffix(".safetensors"): p for p in sorted(folder.glob("*.safetensors"))}
        try:
            complete = sorted(json.loads(done.read_text(encoding="utf-8"))) == sorted(files)
        except (OSError, ValueError, TypeError):
            complete = False
        damaged = [p for p in files.values() if not _as_written(p)] if complete else []  # made again, not used
        if damaged:
            _say(f"{damaged[0]} does not match what was written: converting {path.name} again", quiet)
        if not complete or damaged:
            done.unlink(missing_ok=True)
            for p in files.values():
                p.unlink()
            from .convert import convert_checkpoint

            files = convert_checkpoint(path, arch=arch, config=config,
                                       outputs=lambda r: folder / f"{r}.safetensors",
                                       log=None if quiet else (lambda m: _say(m, False)))
            _record_written(files.values(), path.name)
            _write_json(done, sorted(files))
    return _pick_role(files, role, path)

