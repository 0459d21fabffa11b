"""`adm sample` under torchrun (issue 7), on CPU with gloo over loopback.

Each test starts real processes (torchrun, or two plain processes given RANK / WORLD_SIZE by
hand), because what is under test is how separate processes agree, share work and fail.
Faults are injected by a small launcher (``LAUNCHER`` below) that patches adm_cli in one rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adm_cli.cli import _register, app
from adm_cli.config import UNetConfig
from adm_cli.models import build_model
from adm_cli.weights import save_weights
from conftest import randomize

_register()
SRC = Path(__file__).resolve().parents[1] / "src"
UNET = UNetConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                  num_head_channels=32, learn_sigma=True, class_cond=True, resblock_updown=True)
# 7 samples in batches of 2: the last batch is partial, and the two ranks get unequal shares.
COMMON = ["--device", "cpu", "-n", "7", "--steps", "3", "--class", "1,2,3", "--batch-size", "2", "--quiet"]

LAUNCHER = '''
"""`adm` with a fault injected in one rank. ADM_TEST_FAULT="RANK:KIND:N": exit (hard, before
writing PNG number N+1), kill (SIGKILL itself) / hang / raise at batch N+1, weights (this rank
alone is given a missing --weights file). The time of the fault goes to ADM_TEST_FAULT_LOG."""
import os, signal, sys, time
rank, kind, n = os.environ["ADM_TEST_FAULT"].split(":")
n, calls = int(n), [0]

def fault():
    with open(os.environ["ADM_TEST_FAULT_LOG"], "w") as f:
        f.write(repr(time.time()))
    if kind == "exit":
        os._exit(9)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise RuntimeError("out of memory (injected)")
    time.sleep(3600)

def counted(fn):
    def wrapper(*args, **kwargs):
        if calls[0] >= n:
            fault()
        calls[0] += 1
        return fn(*args, **kwargs)
    return wrapper

if os.environ.get("RANK", "0") == rank:
    from adm_cli import api, outputs
    if kind == "exit":
        outputs.SampleWriter.write_sample = counted(outputs.SampleWriter.write_sample)
    elif kind == "weights":
        sys.argv[sys.argv.index("--weights") + 1] = "/nonexistent/unet.safetensors"
    else:
        api.sample_batch = counted(api.sample_batch)
from adm_cli.cli import main
main()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    weights = save_weights(root / "unet.safetensors", randomize(build_model(UNET), seed=4, std=0.02).state_dict(), UNET)
    launcher = root / "launcher.py"
    launcher.write_text(LAUNCHER)
    return {"root": root, "weights": weights, "launcher": launcher}


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted one-process run (in this process, one thread like the workers)."""
    return _in_process(setup, "reference")


def _in_process(setup, name, *extra):
    out = setup["root"] / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, ["sample", "--weights", str(setup["weights"]), "--out", str(out),
                                       "--seed", "5", *COMMON, *extra])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADM_DIST_TIMEOUT": "60", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env.pop("ADM_DEBUG", None)
    return env


def _start(cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    # A session of its own, so that a test that times out can end every process it started.
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out}")
    return proc.returncode, out


def _torchrun(setup, out: Path, *args: str, nproc: int = 2, fault: str | None = None, env: dict | None = None,
              timeout: float = 120) -> tuple[int, str, float]:
    target = [str(setup["launcher"])] if fault else ["-m", "adm_cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), *target, "sample", "--weights", str(setup["weights"]),
           "--out", str(out), *COMMON, *args]
    extra = {"ADM_TEST_FAULT": fault, "ADM_TEST_FAULT_LOG": str(out.parent / f"{out.name}.fault")} if fault else {}
    start = time.time()
    rc, text = _finish(_start(cmd, _env(**extra, **(env or {})), setup["root"]), timeout)
    return rc, text, time.time() - start


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert names == [f"{k:06d}.png" for k in range(7)] + ["grid.png", "run.json", "samples.npz"]
    for name in names:
        if name != "run.json":  # run.json records timings and the process count
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_processes_write_what_one_process_writes(setup, reference):
    out = setup["root"] / "two"
    rc, text, _ = _torchrun(setup, out, "--seed", "5")
    assert rc == 0, text
    _same_files(reference, out)
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and run["computed"] == {"base": 7} and run["seed"] == 5
    assert not _errors(text) and text.count("grid.png") == 1  # only rank 0 prints (the grid path)

    # Another batch size: the same noise, but float results depend on the batch size at ~1e-6,
    # so a rare pixel may truncate to the next uint8 value; labels and the rest are identical.
    other = _in_process(setup, "batch3", "--batch-size", "3")
    with np.load(reference / "samples.npz") as x, np.load(other / "samples.npz") as y:
        assert x["arr_1"].tolist() == y["arr_1"].tolist() == [1, 2, 3, 1, 2, 3, 1]
        diff = np.abs(x["arr_0"].astype(int) - y["arr_0"])
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_killed_run_resumes_to_the_same_files(setup, reference):
    out = setup["root"] / "killed"
    env = _env(ADM_TEST_FAULT="0:exit:3", ADM_TEST_FAULT_LOG=str(setup["root"] / "killed.fault"))
    cmd = [sys.executable, str(setup["launcher"]), "sample", "--weights", str(setup["weights"]), "--out", str(out),
           "--seed", "5", *COMMON]
    rc, text = _finish(_start(cmd, env, setup["root"]), 60)
    assert rc == 9, text
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert sorted(first) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "run-plan.json").exists() and not (out / "samples.npz").exists()

    changed = CliRunner().invoke(app, ["sample", "--weights", str(setup["weights"]), "--out", str(out), "--resume",
                                       *COMMON, "--steps", "4"])
    assert changed.exit_code == 2 and changed.output.strip().startswith("error: --resume:"), changed.output
    assert "steps" in changed.output and len(changed.output.strip().splitlines()) == 1

    # The same command with --resume, on two processes, without --seed: the recorded one is used.
    rc, text, _ = _torchrun(setup, out, "--resume")
    assert rc == 0, text
    _same_files(reference, out)
    assert {p: (out / p).stat().st_ino for p in first} == {p: first[p][0] for p in first}
    assert {p: (out / p).stat().st_mtime_ns for p in first} == {p: first[p][1] for p in first}
    # Batches of 2: {0, 1} was finished, {2, 3} half written and sampled again whole, so that
    # sample 3 is computed exactly as the uninterrupted run computed it; 5 of 7 samples.
    assert json.loads((out / "run.json").read_text())["computed"] == {"base": 5}
    assert not (out / "run-plan.json").exists() and not list(out.glob(".*incomplete"))


def _fault_to_end(setup, out: Path, end: float) -> float:
    return end - float((out.parent / f"{out.name}.fault").read_text())


@pytest.mark.parametrize("kind", ["weights", "raise", "kill"])
def test_failing_rank_ends_the_run(setup, kind):
    """Two processes given RANK / WORLD_SIZE by hand: no torchrun agent stops the others, the
    ranks do. Rank 1 alone gets a missing weights file, or raises while sampling (it tells rank
    0, which prints the error), or is SIGKILLed (rank 0 notices at once that it is gone)."""
    out, port = setup["root"] / f"rank-{kind}", _free_port()
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), ADM_DIST_TIMEOUT="300", ADM_TEST_FAULT=f"1:{kind}:1",
                   ADM_TEST_FAULT_LOG=str(out.parent / f"{out.name}.fault"))
        cmd = [sys.executable, str(setup["launcher"]), "sample", "--weights", str(setup["weights"]),
               "--out", str(out), "--seed", "5", *COMMON]
        procs.append(_start(cmd, env, setup["root"]))
    start = time.time()
    rc1, text1 = _finish(procs[1], 120)
    rc0, text = _finish(procs[0], 120)
    assert rc0 == 1 and len(_errors(text)) == 1, text
    if kind == "weights":
        assert _errors(text) == ["error: rank 1 failed while planning the run: weights file not found: "
                                 "/nonexistent/unet.safetensors"]
        assert not out.exists()  # rank 0 learnt of it before creating the output folder
        assert time.time() - start < 60
    else:
        latency = _fault_to_end(setup, out, time.time())
        assert latency < 20, latency  # far below ADM_DIST_TIMEOUT=300: no waiting on a timeout
    if kind == "kill":
        assert rc1 == -signal.SIGKILL and "lost contact" in _errors(text)[0]
    else:  # rank 1 exits quietly: rank 0 reported its error
        assert rc1 == 1 and not _errors(text1), text1
    if kind == "raise":
        assert _errors(text) == ["error: rank 1 failed while sampling: RuntimeError: out of memory (injected)"]


def test_hung_rank_ends_the_run(setup):
    """A rank that hangs is given up after ADM_DIST_TIMEOUT; torchrun then stops it."""
    out = setup["root"] / "rank-hang"
    rc, text, _ = _torchrun(setup, out, "--seed", "5", fault="1:hang:0", env={"ADM_DIST_TIMEOUT": "3"})
    latency = _fault_to_end(setup, out, time.time())
    assert rc != 0 and len(_errors(text)) == 1, text
    assert "lost contact" in _errors(text)[0] and "ADM_DIST_TIMEOUT=3" in _errors(text)[0]
    assert 3 <= latency < 3 + 20, latency


def _by_hand(setup, out: Path, *per_rank: list[str], timeout: float = 120) -> list[tuple[int, str]]:
    """Two processes started by hand (as torchrun would start them), each with its own arguments."""
    port = str(_free_port())
    procs = []
    for rank, extra in enumerate(per_rank):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(per_rank)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "-m", "adm_cli", "sample", "--out", str(out), *COMMON, *extra]
        procs.append(_start(cmd, env, setup["root"]))
    return [_finish(p, timeout) for p in procs]


def test_ranks_given_other_seeds_or_weights_are_refused(setup):
    """Rank 0's seed used to overrule another rank's silently, and weights were compared by file
    name; a copy with other values under the same name was sampled from."""
    other = setup["root"] / "other"
    other.mkdir(exist_ok=True)
    changed = save_weights(other / "unet.safetensors",
                           randomize(build_model(UNET), seed=5, std=0.02).state_dict(), UNET, overwrite=True)
    weights = ["--weights", str(setup["weights"])]
    for name, second, word in (("seeds", [*weights, "--seed", "9"], "--seed"),
                               ("weights", ["--weights", str(changed), "--seed", "5"], "weights_sha256")):
        out = setup["root"] / f"refused-{name}"
        (rc0, text0), (rc1, _) = _by_hand(setup, out, [*weights, "--seed", "5"], second)
        assert rc0 != 0 and rc1 != 0
        lines = _errors(text0)
        assert len(lines) == 1 and "rank 1 was started with" in lines[0] and word in lines[0], text0
        assert not out.exists() or not list(out.glob("*.png"))  # refused before any sample


def test_a_bad_flag_or_one_rank_bad_flag_is_said_once(setup):
    """Outside torchrun `adm sample` refuses a bad flag before it imports torch; under a launcher
    the team checks it, so that the line is printed once, by rank 0, whether every rank was
    given the bad value or one rank alone (a rank that quit on its own before joining would
    leave the others waiting for it, and its line would be the only word of why)."""
    weights = ["--weights", str(setup["weights"]), "--seed", "5", "--sampler", "ddim"]
    for name, first, second in (("both", ["--eta", "2"], ["--eta", "2"]), ("rank1", [], ["--eta", "2"])):
        out = setup["root"] / f"bad-flag-{name}"
        (rc0, text0), (rc1, text1) = _by_hand(setup, out, [*weights, *first], [*weights, *second])
        assert rc0 != 0 and rc1 != 0, (text0, text1)
        lines = _errors(text0)
        assert len(lines) == 1 and "--eta must be in [0, 1]" in lines[0], text0
        assert not _errors(text1), text1
        assert not out.exists()
