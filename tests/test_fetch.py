"""`adm fetch` and the cache, against a loopback HTTP server (tests/http_server.py)."""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time

import pytest
from typer.testing import CliRunner

from adm_cli import cache, cli_weights, download  # noqa: F401 - cli_weights registers the commands
from adm_cli.cache import cache_status, converted_path, ensure_weights, fetch_entry, raw_path
from adm_cli.cli import app
from adm_cli.errors import ChecksumError, ConversionError, DownloadError, OfflineError, UsageError
from adm_cli.registry import load_registry
from adm_cli.weights import load_model, read_metadata
from http_server import FileServer
from publishers import one_thread  # noqa: F401 - autouse fixture
from publishers import inline_roles, reference_model, small, write_mmagic, write_openai

DEAD = "http://127.0.0.1:9/origin/"  # the discard port: nothing answers, so only --mirror can work


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints as published: an OpenAI .pt and an mmagic adm-g .pth (U-Net + classifier)."""
    d = tmp_path_factory.mktemp("published")
    unet, clf = reference_model(small("64x64")), reference_model(small("64x64_classifier"))
    openai = write_openai(d / "tiny_64.pt", unet.state_dict()).read_bytes()
    mmagic = write_mmagic(d / "g.pth", unet=unet.state_dict(), classifier=clf.state_dict()).read_bytes()
    return {"tiny_64.pt": openai, "adm-g_tiny-64x64-%s.pth" % hashlib.sha256(mmagic).hexdigest()[:8]: mmagic}


@pytest.fixture
def server(files):
    with FileServer(files) as s:
        yield s


def _registry(path, base: str, files: dict, *, sha: str | None = "published", default: bool = False) -> None:
    """A registry of the test files: origin URLs under ``base``; sha256 published or not."""
    (openai_name, openai), (mmagic_name, _) = files.items()
    digest = {"published": f'sha256 = "{hashlib.sha256(openai).hexdigest()}"\n', None: ""}.get(sha, f'sha256 = "{sha}"\n')
    path.write_text(
        f'["tiny"]\npublisher = "openai"\nurls = ["{base}{openai_name}"]\n{digest}'
        f'{inline_roles(unet="64x64")}\nnoise_schedule = "cosine"\nresolution = 32\nclass_cond = true\n'
        f'classifier = "tiny-g"\nguidance = 1.0\nsampler = "ddpm"\nsteps = 250\ndefault = {str(default).lower()}\n\n'
        f'["tiny-g"]\npublisher = "mmagic"\nurls = ["{base}{mmagic_name}"]\nsha256 = "{mmagic_name[-12:-4]}"\n'
        f'{inline_roles(unet="64x64", classifier="64x64_classifier")}\nnoise_schedule = "cosine"\n')


@pytest.fixture
def env(tmp_path, monkeypatch, files):
    """ADM_HOME and ADM_REGISTRY in tmp_path (origins dead: fetch through --mirror); fast retries."""
    for var in ("ADM_MIRROR", "ADM_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ADM_REGISTRY", str(tmp_path / "registry.toml"))
    monkeypatch.setattr(download, "BACKOFF", 0.01)
    monkeypatch.setattr(download, "TIMEOUT", 10.0)
    _registry(tmp_path / "registry.toml", DEAD, files)
    return tmp_path


def _entry(name):
    return load_registry().get(name)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_fetch_through_mirror_and_convert(env, server, files):
    mmagic_name = list(files)[1]
    clf = ensure_weights("tiny-g", "classifier", mirror=server.base, quiet=True)
    unet = ensure_weights("tiny-g", "unet", mirror=server.base, quiet=True)
    assert [r.name for r in server.requests] == [mmagic_name]  # one download serves both networks
    assert load_model(clf).config == small("64x64_classifier") and load_model(unet).config == small("64x64")
    meta = read_metadata(unet)
    assert meta["adm_registry_name"] == "tiny-g"
    assert meta["adm_source_sha256"] == hashlib.sha256(files[mmagic_name]).hexdigest()
    raw = raw_path(_entry("tiny-g"))
    assert raw.read_bytes() == files[mmagic_name]
    assert json.loads(raw.with_name(raw.name + ".json").read_text())["sha256"] == meta["adm_source_sha256"]
    assert cache_status(_entry("tiny-g")) == cache.CacheStatus(True, True)
    assert ensure_weights("tiny-g", "unet", mirror=server.base) == unet and len(server.requests) == 1
    assert sorted(p.name for p in raw.parent.iterdir()) == sorted(
        [".lock", raw.name, raw.name + ".json", "unet.safetensors", "classifier.safetensors",
         "unet.safetensors.json", "classifier.safetensors.json"])


def test_mirror_from_environment(env, server, monkeypatch):
    monkeypatch.setenv("ADM_MIRROR", server.base.rstrip("/"))
    assert ensure_weights("tiny", quiet=True).name == "unet.safetensors"


def test_broken_transfer_resumes_where_it_stopped(env, server, files):
    _registry(env / "registry.toml", server.base, files)
    server.modes["tiny_64.pt"] = "break"
    raw, digest = fetch_entry(_entry("tiny"), quiet=True)
    first, second = server.requests_for("tiny_64.pt")
    assert first.range is None and 0 < first.sent < len(files["tiny_64.pt"])
    assert second.range == f"bytes={first.sent}-" and second.status == 206
    assert first.sent + second.sent == len(files["tiny_64.pt"])
    assert raw.read_bytes() == files["tiny_64.pt"] and digest == hashlib.sha256(files["tiny_64.pt"]).hexdigest()


def test_server_without_range_support_restarts_from_zero(env, server, files):
    _registry(env / "registry.toml", server.base, files)
    server.modes["tiny_64.pt"] = "norange"
    raw = raw_path(_entry("tiny"))
    raw.parent.mkdir(parents=True)
    raw.with_name(raw.name + ".incomplete").write_bytes(b"x" * 1000)  # left by an interrupted run
    fetch_entry(_entry("tiny"), quiet=True)
    (only,) = server.requests_for("tiny_64.pt")
    assert only.range == "bytes=1000-" and only.status == 200
    assert raw.read_bytes() == files["tiny_64.pt"]
    assert not list(raw.parent.glob("*.incomplete"))


def test_interrupted_partial_is_resumed_by_the_next_run(env, server, files):
    _registry(env / "registry.toml", server.base, files)
    raw = raw_path(_entry("tiny"))
    raw.parent.mkdir(parents=True)
    raw.with_name(raw.name + ".incomplete").write_bytes(files["tiny_64.pt"][:5000])
    fetch_entry(_entry("tiny"), quiet=True)
    (only,) = server.requests_for("tiny_64.pt")
    assert only.range == "bytes=5000-" and only.status == 206 and only.sent == len(files["tiny_64.pt"]) - 5000
    assert raw.read_bytes() == files["tiny_64.pt"]


def test_checksum_mismatch_deletes_the_download(env, server, files):
    _registry(env / "registry.toml", server.base, files, sha="0" * 64)
    actual = hashlib.sha256(files["tiny_64.pt"]).hexdigest()
    with pytest.raises(ChecksumError, match=f"expected sha256 {'0' * 64}, got {actual}"):
        ensure_weights("tiny", quiet=True)
    assert _names(raw_path(_entry("tiny")).parent) == [".lock"]


def test_first_download_checksum_is_recorded_and_enforced(env, server, files):
    _registry(env / "registry.toml", server.base, files, sha=None)
    raw, digest = fetch_entry(_entry("tiny"), quiet=True)
    record = json.loads(raw.with_name(raw.name + ".json").read_text())
    assert record["sha256"] == digest and record["published_checksum"] is False
    assert record["loaded"] is False  # not the reference until it has loaded as a checkpoint
    ensure_weights("tiny", quiet=True)
    assert json.loads(raw.with_name(raw.name + ".json").read_text())["loaded"] is True
    raw.write_bytes(b"tampered" + raw.read_bytes()[8:])  # a damaged cache file is noticed ...
    assert fetch_entry(_entry("tiny"), quiet=True)[1] == digest  # ... and fetched again
    raw.unlink()
    server.files["tiny_64.pt"] = b"different bytes under the same name"
    with pytest.raises(ChecksumError, match="recorded at the first download"):
        fetch_entry(_entry("tiny"), quiet=True)
    assert not raw.exists()


def _record(raw):
    return json.loads(raw.with_name(raw.name + ".json").read_text())


@pytest.mark.parametrize("bad", ["html", "short", "corrupt-partial", "kept-by-an-older-version"])
def test_unusable_first_download_is_removed_and_refetched(env, server, files, bad):
    """No published checksum: a download that does not load (a 200 HTML page, a body cut short
    without Content-Length, a resumed corrupt partial) never becomes the reference; it is
    removed, and the next run downloads a good file."""
    _registry(env / "registry.toml", server.base, files, sha=None)
    good = files["tiny_64.pt"]
    raw = raw_path(_entry("tiny"))
    raw.parent.mkdir(parents=True)
    if bad == "html":
        server.files["tiny_64.pt"] = b"<html><body>Please log in to the network</body></html>"
    elif bad == "short":
        server.modes["tiny_64.pt"] = "short"
    elif bad == "corrupt-partial":
        raw.with_name(raw.name + ".incomplete").write_bytes(b"x" * 1000)
    else:  # what releases before the fix left: the bad file recorded as the reference
        raw.write_bytes(good[: len(good) // 2])
        record = {"sha256": hashlib.sha256(raw.read_bytes()).hexdigest(), "size": raw.stat().st_size,
                  "published_checksum": False, "source": "x", "verified_stat": [0, 0]}
        raw.with_name(raw.name + ".json").write_text(json.dumps(record))
    with pytest.raises(ConversionError, match=r"^tiny: the download was not a valid checkpoint and was removed "):
        ensure_weights("tiny", quiet=True)
    assert _names(raw.parent) == [".lock"]
    server.files["tiny_64.pt"] = good
    ensure_weights("tiny", quiet=True)
    assert raw.read_bytes() == good
    assert _record(raw)["sha256"] == hashlib.sha256(good).hexdigest() and _record(raw)["loaded"] is True


def test_fetch_no_convert_still_checks_a_first_download(env, server, files):
    _registry(env / "registry.toml", server.base, files, sha=None)
    server.files["tiny_64.pt"] = b"<html>Not Found</html>"
    runner = CliRunner()
    result = runner.invoke(app, ["fetch", "tiny", "--no-convert", "-q"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: tiny: the download was not a valid checkpoint and was removed "
                                    "(tiny_64.pt is not a checkpoint: it is an HTML page")
    raw = raw_path(_entry("tiny"))
    assert _names(raw.parent) == [".lock"]
    server.files["tiny_64.pt"] = files["tiny_64.pt"]
    result = runner.invoke(app, ["fetch", "tiny", "--no-convert", "-q"])
    assert result.exit_code == 0, result.output
    assert _record(raw)["loaded"] is True and not (raw.parent / "unet.safetensors").exists()


def test_offline_fetch_from_a_read_only_cache(env, server, files, monkeypatch):
    """Nothing can be created in the cache (a read-only mount, or another user's cache): a
    complete cache is still used. (As root, chmod cannot make a folder read-only: the writes
    are made to fail as a read-only filesystem fails them.)"""
    ensure_weights("tiny", mirror=server.base, quiet=True)
    raw = raw_path(_entry("tiny"))
    (raw.parent / ".lock").unlink()
    os.utime(raw)  # a changed stat: hashed again, and the record cannot be updated
    home = str(env / "home")
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(home) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def read_only_write(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(download.os, "open", read_only_open)
    monkeypatch.setattr(type(raw), "write_text", read_only_write)
    before = _names(raw.parent)
    result = CliRunner().invoke(app, ["fetch", "tiny", "--offline"])
    assert result.exit_code == 0, result.output
    assert "unet: " in result.output and _names(raw.parent) == before
    assert ensure_weights("tiny", offline=True).name == "unet.safetensors"


def test_lock_errors_other_than_read_only_are_reported(tmp_path, monkeypatch):
    def full(path, flags, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(download.os, "open", full)
    with pytest.raises(OSError, match="No space left"):
        with download.file_lock(tmp_path / ".lock"):
            pass


def test_mirror_given_as_a_folder_path(env, files, tmp_path, monkeypatch):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "tiny_64.pt").write_bytes(files["tiny_64.pt"])
    assert ensure_weights("tiny", mirror=str(folder), quiet=True).name == "unet.safetensors"
    assert raw_path(_entry("tiny")).read_bytes() == files["tiny_64.pt"]
    monkeypatch.setattr(download, "BACKOFF", 10.0)  # a retry would show in the time taken
    start = time.monotonic()
    for mirror in (str(tmp_path / "no-such-folder"), "s3://bucket/adm", "ftp:/x"):
        result = CliRunner().invoke(app, ["fetch", "tiny-g", "--mirror", mirror])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: --mirror {mirror!r} is neither")
    with pytest.raises(UsageError):
        ensure_weights("tiny-g", mirror="relative/missing", quiet=True)
    assert time.monotonic() - start < 5


def test_missing_file_in_a_file_mirror_fails_at_once(env, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "BACKOFF", 10.0)  # a retry would show in the time taken
    (tmp_path / "empty").mkdir()
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"empty/tiny_64.pt: No such file or directory$"):
        ensure_weights("tiny", mirror=(tmp_path / "empty").as_uri(), quiet=True)
    with pytest.raises(DownloadError, match="unknown url type"):  # never a ValueError traceback
        download.download(["no-scheme/tiny_64.pt", "s3://bucket/tiny_64.pt"], tmp_path / "x.pt")
    assert time.monotonic() - start < 5
    assert not list(tmp_path.glob("x.pt*"))


def test_404_fails_fast_naming_the_url(env, server, files):
    _registry(env / "registry.toml", server.base + "missing/", files)
    with pytest.raises(DownloadError, match=f"404.*{server.base}missing/tiny_64.pt"):
        ensure_weights("tiny", quiet=True)
    assert len(server.requests) == 1


def test_server_errors_are_retried(env, server, files):
    _registry(env / "registry.toml", server.base, files)
    server.modes["tiny_64.pt"] = "flaky"
    raw, _ = fetch_entry(_entry("tiny"), quiet=True)
    assert [r.status for r in server.requests] == [500, 500, 200]
    assert raw.read_bytes() == files["tiny_64.pt"]


def test_each_retry_is_said_unless_quiet(env, server, files):
    """The pauses add up to ~31 s before a run gives up: each retry is a line on stderr, with
    the reason and the pause (a dead mirror is not silence)."""
    _registry(env / "registry.toml", server.base, files)
    server.modes["tiny_64.pt"] = "flaky"
    result = CliRunner().invoke(app, ["fetch", "tiny", "--no-convert"])
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.output.splitlines() if "; retry " in ln]
    assert len(said) == 2 and said[0].endswith("; retry 1 of 5 in 0.01 s") and "500" in said[0], result.output
    assert said[1].endswith("; retry 2 of 5 in 0.02 s")
    shutil.rmtree(env / "home")
    server.requests.clear()
    result = CliRunner().invoke(app, ["fetch", "tiny", "--no-convert", "--quiet"])
    assert result.exit_code == 0 and result.output == "" and len(server.requests) == 3


def _twice_at_once(fn, timeout=30):
    """fn() in two threads at once: (results, errors)."""
    results, errors = [], []

    def run():
        try:
            results.append(fn())
        except Exception as exc:  # reported by the callers' assertions
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results, errors


def _fetch_twice_at_once(env, server):
    server.chunk_delay = 0.01
    results, errors = _twice_at_once(lambda: fetch_entry(_entry("tiny"), mirror=server.base, quiet=True))
    assert not errors and len(results) == 2 and results[0] == results[1]
    return results[0][0]


def test_two_concurrent_fetches_download_once(env, server, files):
    raw = _fetch_twice_at_once(env, server)
    assert raw.read_bytes() == files["tiny_64.pt"]
    assert len(server.requests_for("tiny_64.pt")) == 1  # the second waited on the lock, then reused


def test_concurrent_fetches_stay_correct_without_the_lock(env, server, files, monkeypatch):
    monkeypatch.setattr(cache, "file_lock", lambda *a, **k: contextlib.nullcontext())
    raw = _fetch_twice_at_once(env, server)
    assert len(server.requests_for("tiny_64.pt")) == 2  # duplicated work, never a corrupt file
    assert raw.read_bytes() == files["tiny_64.pt"]
    assert not list(raw.parent.glob("*.incomplete"))


def test_two_threads_writing_the_record_at_once(tmp_path, monkeypatch):
    """Both writers have their temporary file on disk before either renames it: with one shared
    temporary name (once the process id) the second rename found nothing (FileNotFoundError, seen
    in the test above once in a while)."""
    raw = tmp_path / "w.pt"
    raw.write_bytes(b"weights")
    both_written = threading.Barrier(2, timeout=10)
    write_text = type(raw).write_text

    def write_then_wait(self, *args, **kwargs):
        n = write_text(self, *args, **kwargs)
        both_written.wait()
        return n

    monkeypatch.setattr(type(raw), "write_text", write_then_wait)
    _, errors = _twice_at_once(lambda: cache._write_record(raw, "ab" * 32, False, "http://x/w.pt"))
    assert not errors
    assert json.loads(cache._record_path(raw).read_text())["sha256"] == "ab" * 32
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["w.pt", cache._record_path(raw).name])


def test_offline_is_one_clear_line(env, server, monkeypatch):
    with pytest.raises(OfflineError, match="run `adm fetch tiny` with network access"):
        ensure_weights("tiny", offline=True, mirror=server.base)
    monkeypatch.setenv("ADM_OFFLINE", "1")
    result = CliRunner().invoke(app, ["fetch", "tiny", "--mirror", server.base])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "adm fetch tiny" in result.output
    assert server.requests == []
    # one reading of ADM_OFFLINE for fetch and sample: an unknown value is refused by both
    monkeypatch.setenv("ADM_OFFLINE", "abc")
    from adm_cli.cli import _register

    _register()
    sample = ["sample", "--model", "tiny", "--guidance", "0", "-n", "1", "--mirror", server.base]
    for args in (["fetch", "tiny", "--mirror", server.base], sample):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.output.startswith("error: ADM_OFFLINE must be 1 or 0"), result.output
        assert result.output.count("\n") == 1
    monkeypatch.setenv("ADM_OFFLINE", "off")
    assert not cache.offline_requested()
    assert server.requests == []


def test_quiet_sample_prints_only_the_grid_path_even_when_it_fetches_and_converts(env, server, files, tmp_path):
    """`adm sample -q`: "nothing but errors and, on stdout, the grid's path", also on the run
    that downloads and converts its weights (their progress bars and "wrote ..." lines were
    printed), and for a --weights file converted on first use."""
    from adm_cli.cli import _register

    _register()
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["sample", "--model", "tiny", "--guidance", "0", "-n", "1", "--steps", "2",
                                      "--device", "cpu", "--mirror", server.base, "--out", str(out), "-q"])
    assert result.exit_code == 0 and result.output == f"{out / 'grid.png'}\n", result.output
    assert len(server.requests) == 1 and converted_path(_entry("tiny"), "unet").is_file()  # fetched, converted
    raw = raw_path(_entry("tiny"))
    (tmp_path / "flags.json").write_text(json.dumps(small("64x64").to_dict()))
    out = tmp_path / "by-path"
    result = CliRunner().invoke(app, ["sample", "--weights", str(raw), "--config", str(tmp_path / "flags.json"),
                                      "-n", "1", "--steps", "2", "--device", "cpu", "--out", str(out), "-q"])
    assert result.exit_code == 0 and result.output == f"{out / 'grid.png'}\n", result.output
    assert list((env / "home" / "converted").glob("*/unet.safetensors"))  # it was converted, silently


def test_cli_fetch_res_then_models(env, server, files):
    _registry(env / "registry.toml", DEAD, files, default=True)
    runner = CliRunner()
    result = runner.invoke(app, ["fetch", "--res", "32", "--mirror", server.base, "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(r.name for r in server.requests) == sorted(files)  # the model and its classifier
    result = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    rows = {line.split()[1]: line for line in result.output.splitlines() if "tiny" in line}
    assert "converted" in rows["tiny"] and "converted" in rows["tiny-g"]
    result = runner.invoke(app, ["fetch", "tiny", "--all"])
    assert result.exit_code == 2 and "one of them" in result.output


def test_cli_fetch_no_convert_with_progress(env, server):
    result = CliRunner().invoke(app, ["fetch", "tiny", "--no-convert"], env={"ADM_MIRROR": server.base})
    assert result.exit_code == 0, result.output
    assert "tiny: " in result.output and "sha256" in result.output and "unet:" not in result.output
    assert cache_status(_entry("tiny")) == cache.CacheStatus(fetched=True, converted=False)


def test_fetch_help_documents_every_option():
    result = CliRunner().invoke(app, ["fetch", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--res", "--all", "--mirror", "--offline", "--no-convert", "--quiet", "ADM_MIRROR", "ADM_OFFLINE"):
        assert option in result.output
    assert result.output.count("default") >= 6


# -- what the audit of session 17 found ---------------------------------------------------------


class _FullDisk:
    """A partial file whose writes fail like a full disk once ``room`` bytes are in, after writing
    part of the block (what a short write leaves)."""

    def __init__(self, f, room):
        self._f, self.room = f, room

    def write(self, view):
        if len(view) <= self.room:
            self.room -= len(view)
            return self._f.write(view)
        if self.room:
            n = self._f.write(view[:self.room])
            self.room -= n
            return n
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_a_full_disk_fails_at_once_and_leaves_a_partial_that_resumes_correctly(env, server, files, monkeypatch):
    """A write that fails midway must neither be retried as a network error nor leave stray
    bytes behind what the next request appends (once, the disk filled, space came back, and the
    retry produced a corrupt file recorded with the published sha256)."""
    _registry(env / "registry.toml", server.base, files)
    opened = download._open_part
    room = 1_500_000 + 12345  # not a multiple of the 1 MiB blocks: the second block is cut short
    monkeypatch.setattr(download, "_open_part", lambda part, flags: _FullDisk(opened(part, flags), room)
                        if flags & os.O_APPEND else opened(part, flags))
    result = CliRunner().invoke(app, ["fetch", "tiny", "--quiet"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    raw = raw_path(_entry("tiny"))
    assert f"cannot write to {raw.parent}: No space left on device" in result.output
    assert result.output.rstrip().endswith("(the weights cache: set ADM_HOME to put it elsewhere)")
    assert len(server.requests) == 1  # no retry
    (partial,) = raw.parent.glob("*.incomplete")
    assert partial.read_bytes() == files["tiny_64.pt"][:1 << 20]  # cut back to the last whole block
    monkeypatch.setattr(download, "_open_part", opened)  # space again
    raw, digest = fetch_entry(_entry("tiny"), quiet=True)
    assert server.requests[-1].range == f"bytes={1 << 20}-"
    assert raw.read_bytes() == files["tiny_64.pt"] and digest == hashlib.sha256(files["tiny_64.pt"]).hexdigest()


def test_a_cache_folder_that_cannot_be_made_says_where_it_comes_from(env, monkeypatch):
    """ADM_HOME under a file (or a home with no room): one line naming the folder and the
    variable that moves it; an error outside the cache gets no such hint."""
    (env / "a-file").write_text("")
    monkeypatch.setenv("ADM_HOME", str(env / "a-file" / "cache"))
    result = CliRunner().invoke(app, ["fetch", "tiny", "--quiet"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output == (f"error: Not a directory: {env / 'a-file' / 'cache' / 'tiny'} (the weights cache: set ADM_HOME to "
                             "put it elsewhere)\n")
    result = CliRunner().invoke(app, ["convert-weights", str(env / "a-file"), str(env / "a-file" / "x.safetensors")])
    assert result.exit_code == 1 and "ADM_HOME" not in result.output


def test_fetch_upsample_selects_what_sample_upsample_uses(tmp_path, monkeypatch):
    """`adm fetch --res 256 --upsample` is the three files `adm sample --res 256 --upsample`
    needs, in the order it uses them (seen offline, where each is one line); --upsample without
    --res, or at a size no upsampler makes, is wrong input (exit 2)."""
    monkeypatch.delenv("ADM_REGISTRY", raising=False)
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    for res, want in (("256", ["64x64_diffusion", "64x64_classifier", "64_256_upsampler"]),
                      ("512", ["128x128_diffusion", "128x128_classifier", "128_512_upsampler"])):
        result = CliRunner().invoke(app, ["fetch", "--res", res, "--upsample", "--offline"])
        lines = result.output.splitlines()
        assert result.exit_code == 1 and [ln.split(":")[1].strip() for ln in lines[:-1]] == want, result.output
        assert lines[-1] == "error: 3 of 3 models failed (above)"
    for args, message in ((["--upsample", "64x64_diffusion"], "--upsample goes with --res 256 or 512"),
                          (["--res", "64", "--upsample"], "--upsample needs --res 256 (64 -> 256) or --res 512")):
        result = CliRunner().invoke(app, ["fetch", *args, "--offline"])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
        assert result.output.count("\n") == 1
    assert not (tmp_path / "home").exists()


def test_a_planted_symlink_is_never_written_through(env, server, files, tmp_path):
    _registry(env / "registry.toml", server.base, files)
    server.modes["tiny_64.pt"] = "norange"
    raw = raw_path(_entry("tiny"))
    raw.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's notes")
    raw.with_name(raw.name + ".incomplete").symlink_to(victim)
    fetch_entry(_entry("tiny"), quiet=True)
    assert victim.read_text() == "someone's notes"
    assert not raw.is_symlink() and raw.read_bytes() == files["tiny_64.pt"]
    assert server.requests_for("tiny_64.pt")[0].range is None  # the link was not taken for a partial


def test_a_killed_runs_partial_is_resumed_and_other_leftovers_removed(env, server, files):
    """SIGKILL leaves a private <file>.<token>.incomplete that nothing cleans up. Under the
    entry's lock its writer is gone: resume from it at once (not after STALE_SECONDS), and once the
    file is complete remove what other runs left (gigabytes each, for a real checkpoint)."""
    _registry(env / "registry.toml", server.base, files)
    raw = raw_path(_entry("tiny"))
    raw.parent.mkdir(parents=True)
    data = files["tiny_64.pt"]
    raw.with_name(raw.name + ".0123456789ab.incomplete").write_bytes(data[:7000])
    raw.with_name(raw.name + ".ba9876543210.incomplete").write_bytes(data[:3000])
    fetch_entry(_entry("tiny"), quiet=True)
    (only,) = server.requests_for("tiny_64.pt")
    assert only.range == "bytes=7000-"  # the largest
    assert raw.read_bytes() == data and not list(raw.parent.glob("*.incomplete"))


@pytest.mark.parametrize("mode", ["length-list", "bad-length", "bad-chunk"])
def test_odd_responses_are_taken_or_retried(env, server, files, mode):
    """A Content-Length of one repeated value is the length; an unusable one is none (the body
    ends with the connection); a broken chunked body is a transfer failure like any other."""
    _registry(env / "registry.toml", server.base, files)
    server.modes["tiny_64.pt"] = mode
    raw, _ = fetch_entry(_entry("tiny"), quiet=True)
    assert raw.read_bytes() == files["tiny_64.pt"]
    ranges = [r.range for r in server.requests_for("tiny_64.pt")]
    # (http.client fails the whole 1 MiB read, so the chunk before the bad line never arrives)
    assert ranges == ([None, None] if mode == "bad-chunk" else [None])


def test_sigterm_keeps_the_partial_for_the_next_run(env, server, files):
    """kill, timeout and docker stop send SIGTERM, a closed terminal SIGHUP: Python's default
    ends the process without cleanup, which left a private partial that no run resumed."""
    import signal
    import subprocess
    import sys

    server.chunk_delay = 0.05
    proc = subprocess.Popen([sys.executable, "-m", "adm_cli", "fetch", "tiny", "--mirror", server.base, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, _python_path()))})
    deadline = time.time() + 60
    while not server.requests_for("tiny_64.pt") or server.requests_for("tiny_64.pt")[0].sent < 3 << 19:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)  # (the client writes whole 1 MiB blocks: 1.5 MiB sent means one is on disk)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and err == "error: stopped by SIGTERM\n", (proc.returncode, err)
    raw = raw_path(_entry("tiny"))
    (partial,) = raw.parent.glob("*.incomplete")
    assert partial.name == raw.name + ".incomplete" and partial.stat().st_size > 0
    kept = partial.stat().st_size
    server.chunk_delay = 0.0
    fetch_entry(_entry("tiny"), mirror=server.base, quiet=True)
    assert server.requests_for("tiny_64.pt")[-1].range == f"bytes={kept}-"
    assert raw.read_bytes() == files["tiny_64.pt"]


def _python_path():
    import adm_cli

    return [os.path.dirname(os.path.dirname(adm_cli.__file__)), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]


def test_fetch_of_a_converted_entry_needs_neither_network_nor_the_raw_file(env, server):
    runner = CliRunner()
    assert runner.invoke(app, ["fetch", "tiny", "--mirror", server.base, "--quiet"]).exit_code == 0
    raw = raw_path(_entry("tiny"))
    raw.unlink()  # kept only the conversion, to save the space
    result = runner.invoke(app, ["fetch", "tiny", "--offline"])
    assert result.exit_code == 0 and "tiny: converted already (checked)" in result.output, result.output
    result = runner.invoke(app, ["fetch", "tiny", "--offline", "--no-convert"])  # the raw file itself
    assert result.exit_code == 1 and "not in the cache" in result.output
    assert len(server.requests) == 1


def test_fetch_of_several_goes_on_past_a_failure(env, server, files):
    _registry(env / "registry.toml", server.base + "missing/", files)  # tiny: 404
    text = (env / "registry.toml").read_text().replace(f"{server.base}missing/{list(files)[1]}",
                                                       f"{server.base}{list(files)[1]}")
    (env / "registry.toml").write_text(text)  # tiny-g: served
    result = CliRunner().invoke(app, ["fetch", "tiny", "tiny-g", "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[0].startswith("error: tiny: HTTP 404"), result.output
    assert lines[-1] == "error: 1 of 2 models failed (above)"
    assert cache_status(_entry("tiny-g")) == cache.CacheStatus(True, True)


@pytest.mark.parametrize("mirror", ["http://[bad", "http://localhost:99999/"])
def test_a_malformed_mirror_is_one_line(env, mirror):
    result = CliRunner().invoke(app, ["fetch", "tiny", "--mirror", mirror])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "is not a usable URL" in result.output
    assert not raw_path(_entry("tiny")).parent.exists()  # refused before the entry's folder (and lock) is made


def test_a_damaged_conversion_is_found_and_made_again(env, server, files):
    """Converted files carry the sha256 they were written with: adm sample (when the file's size
    or mtime changed) and adm fetch (always) hash them again, and a damaged one is converted
    again from the verified download instead of being sampled from."""
    from safetensors.torch import load_file

    unet = ensure_weights("tiny", mirror=server.base, quiet=True)
    good, meta = unet.read_bytes(), read_metadata(unet)
    tensors = {k: v.clone() for k, v in load_file(unet).items()}  # (not views of the mapped file)

    def same(path):  # (safetensors writes the metadata in no fixed order: compare what it holds)
        now = load_file(path)
        return read_metadata(path) == meta and now.keys() == tensors.keys() and all(
            now[k].equal(tensors[k]) for k in tensors)
    st = unet.stat()
    damaged = bytearray(good)
    mid = len(good) // 2  # inside the tensors' data: still a readable safetensors file
    damaged[mid:mid + 64] = bytes(b ^ 0xFF for b in damaged[mid:mid + 64])
    unet.write_bytes(bytes(damaged))
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot keeps the mtime: only fetch notices
    assert unet.stat().st_size == st.st_size and ensure_weights("tiny", offline=True) == unet
    assert unet.read_bytes() == bytes(damaged) and not same(unet)
    result = CliRunner().invoke(app, ["fetch", "tiny", "--offline"])
    assert result.exit_code == 0 and "does not match what was written" in result.output, result.output
    assert same(unet)
    unet.write_bytes(bytes(damaged))  # a change that moves the mtime: adm sample's check finds it
    assert ensure_weights("tiny", offline=True) == unet and same(unet)
    assert len(server.requests) == 1  # made again from the cached download each time


def test_an_intact_conversion_whose_mtime_moved_is_hashed_once(env, server, monkeypatch):
    """A copied cache keeps the bytes but not the mtimes: the first use hashes each converted file
    again and records the new mtime, so later uses do not hash it (gigabytes) every time."""
    unet = ensure_weights("tiny", mirror=server.base, quiet=True)
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10 ** 9))
    hashed = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p, *a: hashed.append(os.path.basename(p)) or real(p, *a))
    assert ensure_weights("tiny", offline=True) == unet and hashed == ["unet.safetensors"]
    assert ensure_weights("tiny", offline=True) == unet and hashed == ["unet.safetensors"]  # not again
    mid = unet.stat().st_size // 2
    with open(unet, "r+b") as f:  # a change after that is still found, and made good again
        f.seek(mid)
        f.write(b"\0" * 64)
    assert ensure_weights("tiny", offline=True) == unet and unet.read_bytes()[mid:mid + 64] != b"\0" * 64
