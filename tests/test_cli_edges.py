"""Edge cases of the `adm` entry point and of the checks behind `adm sample` (no sampling)."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from adm_cli import api, cli
from adm_cli.errors import UsageError
from adm_cli.outputs import plan_difference


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
