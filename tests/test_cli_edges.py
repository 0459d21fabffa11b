"""Edge cases of the `adm` entry point and of the checks behind `adm sample` (no sampling)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adm_cli import api, cli
from adm_cli.errors import UsageError
from adm_cli.outputs import plan_difference, read_run_plan, record_batch, write_run_plan


def _main(monkeypatch, capsys, *argv):
    """Run the installed `adm` entry point (cli.main), as a shell would."""
    monkeypatch.setattr(sys, "argv", ["adm", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("argv,message", [
    (["sample", "-n", "abc"], "Invalid value for '--num-samples'"),
    (["sample", "--bogus"], "No such option: --bogus"),
    (["bogus"], "No such command 'bogus'"),
])
def test_usage_errors_are_one_line(monkeypatch, capsys, argv, message):
    code, out, err = _main(monkeypatch, capsys, *argv)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out + err


def test_help_still_works_through_main(monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "sample", "--help")
    assert code == 0 and "--num-samples" in out and "--resume" in out
    code, out, err = _main(monkeypatch, capsys)  # bare `adm`: the help, exit 2 as before
    assert code == 2 and "sample" in out + err and "error:" not in out + err


@pytest.mark.parametrize("value,traceback", [("0", False), ("false", False), ("", False), ("1", True), ("yes", True)])
def test_adm_debug_is_a_boolean(monkeypatch, value, traceback):
    cli._register()
    monkeypatch.setenv("ADM_DEBUG", value)
    res = CliRunner().invoke(cli.app, ["sample", "--model", "demo-digits", "--class", "99", "-n", "1", "--quiet"])
    assert res.exit_code != 0
    if traceback:  # re-raised for the traceback
        assert isinstance(res.exception, UsageError)
    else:
        assert not isinstance(res.exception, UsageError)
        assert res.output.strip() == "error: class index 99 is out of range 0-9"


@pytest.mark.parametrize("kwargs,message", [
    ({"eta": float("nan"), "sampler": "ddim"}, "--eta must be a finite number"),
    ({"eta": float("inf"), "sampler": "ddim"}, "--eta must be a finite number"),
    ({"guidance": float("nan")}, "--guidance must be a finite number"),
    ({"guidance": float("-inf")}, "--guidance must be a finite number"),
    ({"eta": 0.5, "sampler": "ddpm"}, "ddpm ignores it"),
])
def test_sampler_settings_reject_values_that_would_be_ignored_or_garbage(kwargs, message):
    with pytest.raises(UsageError, match=message):
        api.SamplerSettings(**kwargs)
    api.SamplerSettings("ddim", eta=0.5, guidance=2.0)  # finite DDIM values stay fine


def test_a_plan_recorded_with_steps_beside_respacing_still_resumes():
    """Plans written before --respacing cleared the steps shorthand recorded the default steps;
    the respacing decides the timesteps, so resuming such a run is not refused for it."""
    old = {"stages": [{"sampler": "ddim", "steps": 25, "respacing": "ddim10", "num_steps": 10}], "seed": 1}
    new = {"stages": [{"sampler": "ddim", "steps": None, "respacing": "ddim10", "num_steps": 10}], "seed": 1}
    assert plan_difference(old, new) is None
    other = {"stages": [{"sampler": "ddim", "steps": None, "respacing": "ddim12", "num_steps": 12}], "seed": 1}
    assert plan_difference(old, other)[0] in ("stages[0].num_steps", "stages[0].respacing")


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE must be a non-negative integer"),
    ({"WORLD_SIZE": "2", "RANK": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK must be"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "ADM_DIST_TIMEOUT": "inf"},
     "ADM_DIST_TIMEOUT must be a number of seconds in"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "ADM_DIST_TIMEOUT": "nan"},
     "ADM_DIST_TIMEOUT must be a number of seconds in"),
])
def test_bad_launcher_variables_are_one_line(monkeypatch, tmp_path, env, message):
    cli._register()
    monkeypatch.delenv("ADM_DEBUG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    res = CliRunner().invoke(cli.app, ["sample", "--model", "demo-digits", "-n", "1", "--quiet", "--out",
                                       str(tmp_path / "run")])
    assert res.exit_code != 0 and res.output.strip().startswith("error: ") and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("env,silent", [
    ({"WORLD_SIZE": "abc"}, True),
    ({"WORLD_SIZE": "2"}, True),  # no MASTER_ADDR / MASTER_PORT
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "ADM_DIST_TIMEOUT": "abc"}, True),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "-1"}, False),  # its own
])
def test_an_error_every_rank_meets_alike_is_printed_by_rank_0_only(monkeypatch, tmp_path, env, silent):
    cli._register()
    monkeypatch.delenv("ADM_DEBUG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    outputs = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        res = CliRunner().invoke(cli.app, ["sample", "--model", "demo-digits", "-n", "1", "--quiet", "--out",
                                           str(tmp_path / "run")])
        assert res.exit_code != 0 and not (tmp_path / "run").exists()
        outputs[rank] = res.output.strip()
    assert outputs["0"].startswith("error: ") and len(outputs["0"].splitlines()) == 1
    assert outputs["1"] == ("" if silent else outputs["0"])


def test_generate_checks_its_arguments():
    from test_fast import TINY, TINY_CLF, exact

    unet = exact(TINY["new-order"])  # 10 classes
    quick = api.SamplerSettings("ddim", steps=2)
    out = api.generate(unet, classes=[3, 4], settings=quick)  # one image per label, as the docstring shows
    assert out.images.shape[0] == 2 and out.labels.tolist() == [3, 4]
    for kwargs, message in (
        (dict(indices=[]), "indices must be a non-empty list"),
        (dict(num_samples=2, classes=[3, 10]), "class label 10 is out of range"),
        (dict(num_samples=2, classes=[-1, 3]), "class label -1 is out of range"),
        (dict(num_samples=1, settings=api.SamplerSettings("ddim", steps=2, guidance=1.0)), "needs a classifier"),
        (dict(num_samples=1, seed=-5), r"seed must be in 0..2\*\*63 - 1"),
        (dict(num_samples=2, seed=2 ** 63 - 1), r"seed must be in 0..2\*\*63 - 2"),
        (dict(num_samples=1, classifier=unet, settings=api.SamplerSettings("ddim", steps=2, guidance=1.0)),
         "classifier must be a noisy-image classifier, got a UNet"),
    ):
        with pytest.raises(UsageError, match=message):
            api.generate(unet, **{"settings": quick, **kwargs})
    with pytest.raises(UsageError, match="needs a diffusion U-Net, got a Classifier"):
        api.generate(exact(TINY_CLF, seed=4), num_samples=1, settings=quick)
    uncond = exact(TINY["new-order"].replace(class_cond=False))
    with pytest.raises(UsageError, match="needs a classifier"):
        api.generate(uncond, num_samples=1, settings=api.SamplerSettings("ddim", steps=2, guidance=1.0))
    clf = exact(TINY_CLF, seed=4)
    with pytest.raises(UsageError, match="class label 12 is out of range"):
        api.generate(uncond, classes=[12], classifier=clf, settings=api.SamplerSettings("ddim", steps=2, guidance=1.0))
    # what the CLI checks before a run, the library checks too (each was a raw torch or numpy error)
    guided = api.SamplerSettings("ddim", steps=2, guidance=1.0)
    for other, message in ((TINY_CLF.replace(image_size=8), "its image size is 8, the U-Net's 16"),
                           (TINY_CLF.replace(in_channels=4), "its input channels is 4, the U-Net's 3"),
                           (TINY_CLF.replace(num_classes=7), "its class count is 7, the U-Net's 10")):
        with pytest.raises(UsageError, match=message):
            api.generate(unet, num_samples=1, classifier=exact(other, seed=4), settings=guided)
    with pytest.raises(UsageError, match=r"classes must be integer labels, got 'golden retriever'"):
        api.generate(unet, classes=["golden retriever"], settings=quick)
    assert api.generate(unet, classes=torch.tensor([3]), settings=quick).labels.tolist() == [3]
    with pytest.raises(UsageError, match="low_res is for an upsampler"):
        api.generate(unet, num_samples=1, low_res=np.zeros((1, 8, 8, 3), np.uint8), settings=quick)
    up = exact(TINY["upsampler"])
    with pytest.raises(UsageError, match="this U-Net is an upsampler: pass low_res"):
        api.generate(up, num_samples=1, settings=quick)
    with pytest.raises(UsageError, match="got 1 low_res images for 2 samples"):
        api.generate(up, num_samples=2, low_res=np.zeros((1, 8, 8, 3), np.uint8), settings=quick)


def test_prepare_for_a_missing_cuda_device_is_one_line(monkeypatch):
    from test_fast import TINY, exact

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="device cuda was asked for but no CUDA device is available"):
        api.prepare(exact(TINY["new-order"]), device="cuda")
    with pytest.raises(UsageError, match="^device cuda:1 was asked for but no CUDA device is available$"):
        api.prepare(exact(TINY["new-order"]), device="cuda:1")  # named as given
    from adm_cli.runner import pick_device

    with pytest.raises(UsageError, match="^--device cuda:1 was asked for but no CUDA device is available$"):
        pick_device("cuda:1")


def test_plans_on_other_kinds_of_device_differ():
    """CPU and CUDA generators draw different noise: a run cannot be resumed (or shared) across
    them; another GPU index is the same run."""
    plan = {"stages": [], "num_samples": 2, "seed": 1, "labels": None, "dtype": "auto", "device": "cpu"}
    assert plan_difference(plan, {**plan, "device": "cuda:0"})[0] == "device_type"
    assert plan_difference({**plan, "device": "cuda:0"}, {**plan, "device": "cuda:3"}) is None


def test_an_empty_respacing_means_every_step():
    """--respacing "" is the reference's "all T steps"; it used to fall back to the default."""
    from adm_cli.runner import SampleRequest, plan_run

    assert api.SamplerSettings("ddim", respacing="").respacing_for(1000) == ""
    plan = plan_run(SampleRequest(model="demo-digits", respacing="", sampler="ddim", classes="1", num_samples=1,
                                  device="cpu"))
    assert plan.stages[0].num_steps == plan.stages[0].diffusion_steps


@pytest.mark.parametrize("device,compile_,flag,want", [
    ("cuda", False, None, True),    # the default on CUDA: replay the steps as graphs
    ("cuda", True, None, False),    # --compile alone: its own kernels, no graphs
    ("cuda", False, False, False),  # --no-cuda-graph
    ("cpu", False, None, False),    # nothing to replay off CUDA
    ("cpu", False, True, True),     # asked for: recorded (and ignored when sampling)
])
def test_cuda_graphs_default_on_for_cuda(monkeypatch, device, compile_, flag, want):
    from adm_cli import runner
    from adm_cli.runner import SampleRequest, plan_run

    monkeypatch.setattr(runner, "pick_device", lambda name: device)  # plan only: nothing runs on it
    plan = plan_run(SampleRequest(model="demo-digits", classes="1", num_samples=1, compile=compile_,
                                  cuda_graph=flag))
    assert plan.cuda_graph is want and plan.describe()["cuda_graph"] is want


@pytest.mark.parametrize("flags,want", [([], True), (["--no-cuda-graph"], False), (["--compile"], False),
                                        (["--cuda-graph"], True)])
def test_adm_sample_on_cuda_replays_graphs_unless_told_not_to(monkeypatch, tmp_path, flags, want):
    """The command line's own default, through the whole CLI to the plan it executes (the
    plan printed names the graphs)."""
    from adm_cli import cli_sample, runner  # noqa: F401 (cli_sample registers `adm sample`)

    seen = []

    def stop(plan, **kwargs):
        seen.append(plan)
        raise UsageError("stopped before sampling")

    monkeypatch.setattr(runner, "pick_device", lambda name: "cuda")  # planned only: nothing runs on it
    monkeypatch.setattr(runner, "execute", stop)  # (cli_sample imports it when a sample runs)
    res = CliRunner().invoke(cli.app, ["sample", "--model", "demo-digits", "--class", "1", "-n", "1",
                                       "--out", str(tmp_path / "o"), *flags])
    assert "stopped before sampling" in res.output and len(seen) == 1, res.output
    assert seen[0].cuda_graph is want
    assert ("CUDA graphs" in res.output) is want


@pytest.mark.parametrize("recorded,flag,want", [(False, None, False), (True, None, True),
                                                (False, True, True), (True, False, False)])
def test_resume_keeps_the_graphs_setting_it_began_with(monkeypatch, tmp_path, recorded, flag, want):
    """A run recorded eager (by the release before graphs became the default, or with
    --no-cuda-graph) goes on eager when resumed without either flag: graphed steps may differ
    from eager ones by a level, and a resumed run must equal an uninterrupted one. A flag given
    on the resume wins."""
    from adm_cli import runner
    from adm_cli.runner import SampleRequest, plan_run

    out = tmp_path / "run"
    cli._register()
    res = CliRunner().invoke(cli.app, ["sample", "--model", "demo-digits", "--class", "1", "-n", "2", "--steps",
                                       "2", "--device", "cpu", "--out", str(out), "--quiet",
                                       "--cuda-graph" if recorded else "--no-cuda-graph"])
    assert res.exit_code == 0, res.output
    plan_file = out / "run.json"  # a finished run keeps its plan there
    assert json.loads(plan_file.read_text())["cuda_graph"] is recorded
    (out / "000001.png").unlink()  # one sample left to do
    monkeypatch.setattr(runner, "pick_device", lambda name: "cuda")  # where graphs are the default
    plan = plan_run(SampleRequest(model="demo-digits", classes="1", num_samples=2, steps=2, out=out, resume=True,
                                  cuda_graph=flag))
    assert plan.cuda_graph is want


def _sample(out, *extra, env=None):
    cli._register()
    return CliRunner().invoke(cli.app, ["sample", "--model", "demo-digits", "-n", "2", "--steps", "2", "--device",
                                        "cpu", "--batch-size", "1", "--quiet", "--out", str(out), *extra], env=env)


@pytest.mark.parametrize("plan,message", [
    ({"seed": 3, "stages": 5}, "stages is 5, not a list of objects"),
    ({"seed": 3, "classes": 7}, "classes is 7, not a string or null"),
    ({"seed": 3, "stages": [5]}, "stages is [5], not a list of objects"),
    ({"seed": 3, "stages": [{"name": "base", "model": ["a"]}]}, 'stages[0].model is ["a"], not a string or null'),
    ({"seed": 3, "stages": [{"name": "base", "eta": "0"}]}, 'stages[0].eta is "0", not a number'),
    ({"seed": True}, "seed is true, not an integer"),
    ({"seed": 3, "num_samples": 2.0}, "num_samples is 2.0, not an integer"),
    ({"seed": 3, "labels": [1, "2"]}, 'labels is [1, "2"], not a list of integers or null'),
    ({"seed": 3, "cuda_graph": "no"}, 'cuda_graph is "no", not a boolean'),
    ({"seed": 3, "nrow": "4"}, 'nrow is "4", not an integer or null'),
    ({"seed": 3, "resolved_batch_size": [2]}, "resolved_batch_size is [2], not an object of batch sizes"),
    ({"seed": 3, "resolved_batch_size": {"base": "2"}}, 'resolved_batch_size is {"base": "2"}, not an object of'),
])
def test_resume_refuses_a_plan_with_a_field_of_the_wrong_type(monkeypatch, tmp_path, plan, message):
    """A run-plan.json edited into valid JSON of other types was a TypeError or AttributeError
    traceback (in the plan comparison, in the printed plan); now one line naming the field."""
    monkeypatch.delenv("ADM_DEBUG", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    text = json.dumps(plan)
    (out / "run-plan.json").write_text(text)
    res = _sample(out, "--resume")
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: cannot read {out / 'run-plan.json'} ({message}")
    assert lines[0].endswith("); choose a new --out to start the run afresh")
    assert [p.name for p in out.iterdir()] == ["run-plan.json"] and (out / "run-plan.json").read_text() == text


def test_plans_the_current_code_writes_read_back_whole(monkeypatch, tmp_path):
    """The type checks refuse nothing this version writes: the plan recorded before sampling
    (with the batch size added as it is chosen), run.json of a finished run, and that run
    resumed from either."""
    from adm_cli.runner import SampleRequest, plan_run

    monkeypatch.delenv("ADM_DEBUG", raising=False)
    for classes, nrow in ((None, None), ("3,4", 2)):  # random labels and no --nrow; given ones
        plan = plan_run(SampleRequest(model="demo-digits", classes=classes, num_samples=2, steps=2, device="cpu",
                                      nrow=nrow, out=tmp_path / f"plan-{nrow}"))
        info = plan.describe()
        write_run_plan(tmp_path, info)
        assert read_run_plan(tmp_path) == json.loads(json.dumps(info, default=str))
        record_batch(tmp_path, "base", 2)
        record_batch(tmp_path, "base", 1)
        assert read_run_plan(tmp_path)["resolved_batch_size"] == {"base": [2, 1]}
        (tmp_path / "run-plan.json").unlink()
    out = tmp_path / "run"
    res = _sample(out, "--class", "5")
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert read_run_plan(out) == run and run["labels"] == [5, 5] and run["resolved_batch_size"] == {"base": 1}
    first = (out / "000001.png").read_bytes()
    (out / "000001.png").unlink()  # a run cut short, resumed from run.json
    (out / "grid.png").unlink()
    res = _sample(out, "--resume")
    assert res.exit_code == 0, res.output
    assert (out / "000001.png").read_bytes() == first
    (out / "run.json").rename(out / "run-plan.json")  # ... and from the plan a run in progress keeps
    (out / "000001.png").unlink()
    res = _sample(out, "--resume")
    assert res.exit_code == 0, res.output
    assert (out / "000001.png").read_bytes() == first and read_run_plan(out)["computed"] == {"base": 1}


@pytest.mark.parametrize("name", ["ADM_WINOGRAD", "ADM_FUSED"])
@pytest.mark.parametrize("value,want", [(None, True), ("", True), ("1", True), ("yes", True), (" On ", True),
                                        ("true", True), ("0", False), ("false", False), ("no", False),
                                        ("OFF", False)])
def test_on_off_switches_read_like_adm_offline(monkeypatch, name, value, want):
    """ADM_WINOGRAD and ADM_FUSED understood only "0": ADM_WINOGRAD=false left Winograd on."""
    from adm_cli import fast

    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert fast.env_switch(name) is want
    if name == "ADM_FUSED" and not want:
        assert not fast.use_fused_kernels("cuda")  # before any look at the device


def test_winograd_off_by_any_false_word(monkeypatch):
    from test_fast import TINY, exact

    from adm_cli import fast, winograd

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)  # the tiny net's convs qualify
    monkeypatch.setattr(winograd, "MIN_TILES", 1)
    uses = lambda m: any(getattr(c, "use_winograd", False) for c in m.modules())  # noqa: E731
    monkeypatch.setenv("ADM_WINOGRAD", "on")
    assert uses(fast.prepare(exact(TINY["new-order"]), device="cpu", dtype="float32"))
    for off in ("false", "off", "no"):
        monkeypatch.setenv("ADM_WINOGRAD", off)
        assert not uses(fast.prepare(exact(TINY["new-order"]), device="cpu", dtype="float32"))


@pytest.mark.parametrize("name", ["ADM_WINOGRAD", "ADM_FUSED"])
def test_an_unknown_switch_value_is_one_line(monkeypatch, tmp_path, name):
    from adm_cli import fast
    from test_fast import TINY, exact

    monkeypatch.delenv("ADM_DEBUG", raising=False)
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(UsageError, match=rf"^{name} must be 1 or 0 \(or true/false, yes/no, on/off\), got 'maybe'$"):
        fast.prepare(exact(TINY["new-order"]), device="cpu")  # on any device, not only where it is used
    res = _sample(tmp_path / "run", env={name: "maybe"})
    assert res.exit_code == 2 and res.output == f"error: {name} must be 1 or 0 (or true/false, yes/no, on/off), " \
                                                "got 'maybe'\n", res.output
    assert not (tmp_path / "run").exists()  # refused before the plan is written


def test_help_version_and_models_answer_without_importing_torch(tmp_path, monkeypatch):
    """`adm --help`, each command's --help, `adm --version` and `adm models` (with a converted
    file in the cache, whose metadata it reads) import neither torch nor torch.distributed:
    measured 0.4-1.1 s here against 3-5 s when the command modules imported the runner and the
    converter at load time. A sample imports torch when it starts."""
    import os
    import shutil
    import subprocess

    from adm_cli.cache import converted_path
    from adm_cli.evaluation import demo_path
    from adm_cli.registry import load_registry

    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    entry = next(e for e in load_registry().entries if not e.bundled and list(e.roles) == ["unet"])
    dst = converted_path(entry, "unet")  # a converted file in the cache: `adm models` reads its metadata
    dst.parent.mkdir(parents=True)
    shutil.copy(demo_path("demo-digits"), dst)
    script = tmp_path / "run.py"
    script.write_text("import sys; from adm_cli.cli import main\n"
                      "sys.argv = ['adm', *sys.argv[1:]]\n"
                      "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
                      "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")

    def adm(*args):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              env=dict(os.environ), timeout=120)
        return proc.stdout.strip().splitlines()[-1], proc

    for args in (["--help"], ["sample", "--help"], ["fetch", "--help"], ["convert-weights", "--help"], ["--version"],
                 ["models"]):
        last, proc = adm(*args)
        assert last in ("NO-TORCH 0", "NO-TORCH None"), (args, proc.stdout[-500:], proc.stderr[-500:])
    listing = adm("models")[1].stdout
    assert entry.name in listing and "ADM models" in listing
    last, proc = adm("sample", "--model", "demo-digits", "-n", "1", "--steps", "2", "--out", str(tmp_path / "o"), "-q")
    assert last == "TORCH 0", proc.stderr[-500:]


def test_bad_requests_are_refused_before_torch_is_imported(tmp_path, monkeypatch):
    """A slip in `adm sample`'s or `adm convert-weights`' arguments cost the 3-5 s of importing
    torch before its one line (3.4-4.8 s measured here); request.check_request and
    flags.conversion_args read only the flags, the ADM_* variables, the registry (with the bundled
    demo models' metadata), --config, --mirror, --out's recorded plan, whether the files are there
    (in the cache too) and what their first bytes say they are (formats.py): 0.6-1.1 s. Each case exits with its code and
    line, imports no torch and creates nothing; the library's entry (runner.plan_run,
    convert.convert_checkpoint) refuses the same arguments with the same words."""
    import os
    import re
    import subprocess
    import zipfile
    from unittest import mock

    import adm_cli
    from adm_cli.convert import convert_checkpoint
    from adm_cli.runner import SampleRequest, plan_run

    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "grid.png").write_bytes(b"")
    unseeded = tmp_path / "unseeded"  # a run whose plan lost its seed (edited by hand)
    unseeded.mkdir()
    (unseeded / "run-plan.json").write_text(json.dumps({"num_samples": 2, "classes": None}))
    flags = tmp_path / "flags.json"
    flags.write_text('{"image_size": 64,')  # broken JSON
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not read")
    page = tmp_path / "page.pt"  # what a proxy's login page saved under a checkpoint's name looks like
    page.write_bytes(b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    pointer = tmp_path / "clf.safetensors"  # a clone made without `git lfs pull`
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 527\n")
    bundled = Path(adm_cli.__file__).parent / "demo" / "demo-digits.safetensors"
    renamed = tmp_path / "torch.safetensors"  # torch's zip archive under a safetensors name
    with zipfile.ZipFile(renamed, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")

    def plan(**request):
        return lambda: plan_run(SampleRequest(**{"device": "cpu", "offline": True, **request}))

    def convert(**kwargs):
        return lambda: convert_checkpoint(**kwargs)

    demo = ["sample", "--model", "demo-digits"]
    cases = [  # (arguments, the same call to the library or None, exit code, words of the line)
        (["sample", "--model", "nosuch"], plan(model="nosuch"), 2, "unknown model 'nosuch'"),
        (["sample", "--res", "100"], plan(res=100), 2, "--res 100 is not available"),
        ([*demo, "--class", "10"], plan(model="demo-digits", classes="10"), 2, "out of range 0-9"),
        ([*demo, "-n", "2", "--class", "1,2,3"], plan(model="demo-digits", num_samples=2, classes="1,2,3"), 2,
         "--class lists 3 classes but -n is 2"),
        ([*demo, "--sampler", "ddim", "--eta", "2"], plan(model="demo-digits", sampler="ddim", eta=2.0), 2,
         "--eta must be in [0, 1]"),
        ([*demo, "--respacing", "ddimx"], plan(model="demo-digits", respacing="ddimx"), 2, "bad respacing 'ddimx'"),
        ([*demo, "--seed", "-1"], plan(model="demo-digits", seed=-1), 2, "--seed must be in"),
        ([*demo, "--device", "gpu"], plan(model="demo-digits", device="gpu"), 2, "unknown --device 'gpu'"),
        (["sample", "--model", "demo-digits-uncond", "--class", "3", "--guidance", "0"],
         plan(model="demo-digits-uncond", classes="3", guidance=0.0), 2, "is unconditional"),
        ([*demo, "--classifier", "demo-digits"], plan(model="demo-digits", classifier="demo-digits"), 2,
         "holds a diffusion model, not a classifier"),
        (["sample", "--weights", "x.pt", "--model", "demo-digits"], plan(weights="x.pt", model="demo-digits"), 2,
         "cannot be combined"),
        (["sample", "--weights", "x.pt", "--guidance", "1"], plan(weights="x.pt", guidance=1.0), 2,
         "needs --classifier-weights"),
        (["sample", "--weights", "x.pt"], plan(weights="x.pt"), 1, "weights file not found: x.pt"),
        (["sample", "--weights", str(ckpt), "--config", str(flags)], plan(weights=ckpt, config=flags), 2,
         "flags.json is not valid JSON"),
        ([*demo, "--out", str(taken)], None, 1, "already holds a run"),
        (["sample", "--res", "64", "--mirror", "mirror-typo"], plan(res=64, mirror="mirror-typo", offline=False), 2,
         "--mirror 'mirror-typo' is neither an http(s):// or file:// URL nor an existing folder"),
        (["sample", "--res", "256", "--upsample", "--offline"], plan(res=256, upsample=True), 1,
         "64x64_diffusion, 64x64_classifier, 64_256_upsampler are not in the cache"),
        ([*demo, "-n", "2", "--out", str(unseeded), "--resume"],
         plan(model="demo-digits", num_samples=2, out=unseeded, resume=True), 2,
         f"--resume: the plan in {unseeded} records no seed; pass --seed or choose a new --out"),
        (["convert-weights", "x.pt"], convert(src="x.pt"), 1, "checkpoint not found: x.pt"),
        (["convert-weights", str(ckpt), "--arch", "64x64_diffuson"], convert(src=ckpt, arch="64x64_diffuson"), 2,
         "did you mean 64x64_diffusion"),
        (["convert-weights", str(ckpt), "--config", str(flags)], convert(src=ckpt, config=flags), 2,
         "flags.json is not valid JSON"),
        (["convert-weights", str(ckpt), "--dtype", "f8"], convert(src=ckpt, dtype="f8"), 2, "--dtype must be one of"),
        (["convert-weights", str(ckpt), "--arch", "64x64_diffusion", "--arch", "128x128_diffusion"],
         convert(src=ckpt, arch=["64x64_diffusion", "128x128_diffusion"]), 2, "--arch names two unet architectures"),
        (["convert-weights", str(ckpt), "--arch", "demo-digits"], convert(src=ckpt, arch="demo-digits"), 2,
         "--arch demo-digits: a bundled file, whose architecture is in the file"),
        (["sample", "--weights", str(page)], plan(weights=page), 1,
         "page.pt is not a checkpoint: it is an HTML page"),
        (["sample", "--weights", str(renamed)], plan(weights=renamed), 1,
         "torch.safetensors is a torch checkpoint (a zip archive), not a safetensors file: name it torch.pt"),
        (["sample", "--weights", str(bundled), "--classifier-weights", str(pointer)],
         plan(weights=bundled, classifier_weights=pointer), 1, "clf.safetensors is not a checkpoint: it is a Git LFS pointer"),
        (["convert-weights", str(page)], convert(src=page), 1, "page.pt is not a checkpoint: it is an HTML page"),
        (["convert-weights", str(ckpt), "--arch", "64x64_diffusion"], convert(src=ckpt, arch="64x64_diffusion"), 1,
         "model.pt is not a checkpoint: it is a text file (it begins 'not read')"),
    ]
    # the environment variables a run reads, each refused in the same way
    for name, value, words in [("ADM_CPU_BATCH", "0", "ADM_CPU_BATCH must be a positive integer, got '0'"),
                               ("ADM_WINOGRAD", "maybe", "ADM_WINOGRAD must be 1 or 0"),
                               ("ADM_FUSED", "2", "ADM_FUSED must be 1 or 0"),
                               ("ADM_OFFLINE", "y", "ADM_OFFLINE must be 1 or 0")]:
        cases.append(([*demo, f"env:{name}={value}"], plan(model="demo-digits"), 2, words))
    script = tmp_path / "run.py"
    script.write_text("import json, os, sys; from unittest import mock; from adm_cli.cli import main\n"
                      "for args in json.loads(sys.argv[1]):\n"
                      "    env = dict(a[4:].split('=') for a in args if a.startswith('env:'))\n"
                      "    sys.argv = ['adm', *[a for a in args if not a.startswith('env:')]]\n"
                      "    print('CASE', file=sys.stderr, flush=True)\n"
                      "    try:\n        with mock.patch.dict(os.environ, env):\n            main()\n"
                      "    except SystemExit as e:\n        print('EXIT', e.code, flush=True)\n"
                      "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    argv = [args if args[0] != "sample" or "--out" in args else [*args, "--out", str(tmp_path / f"out{i}")]
            for i, (args, *_) in enumerate(cases)]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(script), json.dumps(argv)], capture_output=True, text=True,
                          env=dict(os.environ), cwd=tmp_path, timeout=120)
    codes = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("EXIT")]
    lines = [chunk.strip().splitlines() for chunk in proc.stderr.split("CASE\n")[1:]]
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH", proc.stderr[-1000:]
    assert len(codes) == len(lines) == len(cases), proc.stderr[-1000:]
    for (args, library, code, words), got, said in zip(cases, codes, lines):
        assert got == code and len(said) == 1 and said[0].startswith("error: ") and words in said[0], (args, said)
        if library is not None:
            env = dict(a[4:].split("=") for a in args if a.startswith("env:"))
            with mock.patch.dict(os.environ, env), pytest.raises(
                    Exception, match="^" + re.escape(said[0][len("error: "):]) + "$"):
                library()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no ADM_HOME, no file
