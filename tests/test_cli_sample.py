"""`adm sample` end to end on small random-weight models (issue 4)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adm_cli import request as request_api, runner as run_api
from adm_cli.cli import _register, app
from adm_cli.errors import OutputError, SamplingError, UsageError
from adm_cli.outputs import hold_run_dir, open_run_dir
from adm_cli.config import ClassifierConfig, UNetConfig
from adm_cli.models import build_model
from conftest import randomize

_register()
runner = CliRunner()

UNET = UNetConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                  num_head_channels=32, learn_sigma=True, class_cond=True, resblock_updown=True)
UNCOND = UNET.replace(class_cond=False)
CLASSIFIER = ClassifierConfig(image_size=16, classifier_width=32, classifier_depth=1, channel_mult="1,2",
                              classifier_attention_resolutions="8", num_head_channels=32)


def _flags(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k != "kind"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random-weight OpenAI-style .pt files, converted with `adm convert-weights`."""
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for name, cfg in (("unet", UNET), ("uncond", UNCOND), ("classifier", CLASSIFIER)):
        model = randomize(build_model(cfg), seed=len(name), std=0.02)
        pt = root / f"{name}.pt"
        torch.save(model.state_dict(), pt)
        conf = root / f"{name}.json"
        conf.write_text(json.dumps(_flags(cfg)))
        dst = root / f"{name}.safetensors"
        res = runner.invoke(app, ["convert-weights", str(pt), str(dst), "--config", str(conf)])
        assert res.exit_code == 0, res.output
        out[name] = dst
    return out


def _sample(tmp_path, files, *extra, model="unet", name="run"):
    out = tmp_path / name
    args = ["sample", "--weights", str(files[model]), "--out", str(out), "--seed", "5", "--device", "cpu",
            "--quiet", *extra]
    return runner.invoke(app, args), out


@pytest.mark.parametrize("sampler,steps", [("ddpm", "4"), ("ddim", "3"), ("dpm++2m", "3")])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_sample_writes_every_output(tmp_path, files, sampler, steps, guided):
    extra = ["--sampler", sampler, "--steps", steps, "-n", "2", "--class", "207,golden retriever"]
    if guided:
        extra += ["--classifier-weights", str(files["classifier"]), "--guidance", "2"]
    res, out = _sample(tmp_path, files, *extra)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000000.png", "000001.png", "grid.png", "run.json", "samples.npz"]
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].tolist() == [207, 207] and npz["arr_1"].dtype == np.int64
        images = npz["arr_0"]
    for k in range(2):
        with Image.open(out / f"{k:06d}.png") as im:
            assert im.size == (16, 16) and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), images[k])
            settings = json.loads(im.text["settings"])
            assert im.text["class"] == "207" and im.text["seed"] == "5" and im.text["index"] == str(k)
            stage = settings["stages"][0]
            assert stage["sampler"] == sampler and stage["guidance"] == (2.0 if guided else 0.0)
            assert stage["respacing"] == (f"ddim{steps}" if sampler == "ddim" else steps)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 5 and run["labels"] == [207, 207] and run["num_samples"] == 2
    assert not list(out.glob(".*incomplete"))


def test_same_seed_same_images_whatever_the_batch_size(tmp_path, files):
    common = ["--sampler", "ddpm", "--steps", "3", "-n", "4", "--class", "1,2"]
    a, out_a = _sample(tmp_path, files, *common, "--batch-size", "1", name="b1")
    b, out_b = _sample(tmp_path, files, *common, "--batch-size", "4", name="b4")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    with np.load(out_a / "samples.npz") as x, np.load(out_b / "samples.npz") as y:
        a_img, b_img = x["arr_0"].astype(int), y["arr_0"].astype(int)
        assert x["arr_1"].tolist() == y["arr_1"].tolist() == [1, 2, 1, 2]
    assert not np.array_equal(a_img[0], a_img[2])  # different k, different image
    # The random streams are identical; the networks' float arithmetic may differ by rounding
    # with the batch size (oneDNN picks kernels by shape), which can move a rare pixel by one level.
    diff = np.abs(a_img - b_img)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_noise_streams_do_not_depend_on_the_batch():
    from adm_cli.noise import SampleNoise, seeds_for

    whole = SampleNoise(seeds_for(5, range(4)))
    parts = [SampleNoise(seeds_for(5, [k])) for k in range(4)]
    x = torch.empty(4, 3, 8, 8)
    for _ in range(3):  # x_T, then two steps
        assert torch.equal(whole(x), torch.cat([p(x[:1]) for p in parts]))


def test_the_upsampler_stage_has_noise_of_its_own():
    """Both stages used S + k: the upsampler's x_T began with the very numbers of the base
    image's x_T (and its next ones were the base's step noise)."""
    from adm_cli.noise import SampleNoise, seeds_for

    base = SampleNoise(seeds_for(5, range(3)))
    up = SampleNoise(seeds_for(5, range(3), stream=1))
    x_base, x_up = base.initial((3, 8, 8)), up.initial((3, 8, 8))
    assert not torch.isclose(x_base.flatten(), x_up.flatten()).any()
    assert not torch.isclose(base(x_base).flatten(), x_up.flatten()).any()
    # still one stream per sample: the same whatever the batch, and fixed by (S, k, stage)
    assert seeds_for(5, [2], stream=1) == seeds_for(5, range(3), stream=1)[2:] == seeds_for(5, [2], 1)
    assert len(set(seeds_for(5, range(100), 1)) | set(seeds_for(5, range(100)))) == 200


def test_random_classes_are_recorded(tmp_path, files):
    res, out = _sample(tmp_path, files, "--sampler", "ddim", "--steps", "2", "-n", "3")
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == run["labels"] and all(0 <= c < 1000 for c in run["labels"])


def test_unconditional_model_needs_a_classifier_for_class(tmp_path, files):
    res, out = _sample(tmp_path, files, "--steps", "2", "-n", "1", "--class", "3", model="uncond")
    assert res.exit_code != 0 and "unconditional" in res.output
    assert not out.exists()
    ok, out = _sample(tmp_path, files, "--steps", "2", "-n", "2", "--class", "hamster", "--classifier-weights",
                      str(files["classifier"]), "--guidance", "4", model="uncond", name="ok")
    assert ok.exit_code == 0, ok.output
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_1"].tolist() == [333, 333]


@pytest.mark.parametrize("args,message", [
    (["--class", "1000"], "out of range"),
    (["--class", "golden retreiver"], "golden retriever"),
    (["--steps", "0"], "--steps must be at least 2"),
    # one timestep: the network would 'denoise' pure noise as if at t = 0 (the reference crashes)
    (["--steps", "1"], "--steps must be at least 2"),
    (["--respacing", "1"], "it selects one step (t = 0)"),
    (["--respacing", "0,1"], "it selects one step (t = 500)"),
    (["--sampler", "ddim", "--eta", "1.5"], "--eta must be in [0, 1]"),  # 1 - a' - sigma^2 < 0
    (["--sampler", "ddim", "--eta", "-0.1"], "--eta must be in [0, 1]"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--respacing", "ddim7x"], "respacing"),
    (["--batch-size", "zero"], "--batch-size"),
    (["--cuda-graph", "--compile"], "--cuda-graph and --compile"),
    (["--sampler", "dpm++2m", "--eta", "0.5"], "dpm++2m is deterministic"),
    (["--sampler", "heun"], "unknown sampler 'heun'"),
    # seeds S + k must be generator seeds: 0 <= S and S + n - 1 < 2**63 (checked before any file)
    (["--seed", "-1"], "--seed must be in 0.."),
    (["--seed", str(2 ** 63 - 1), "-n", "2"], "--seed must be in 0..9223372036854775806"),
    (["--seed", str(2 ** 64 + 1)], "--seed must be in"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["-n", "10000001"], "--num-samples must be at most 10,000,000"),
    (["--batch-size", "\u00b2"], "--batch-size must be a positive integer"),
    (["--device", "cuda:x"], "unknown --device 'cuda:x'"),
    (["--device", "cuda:-1"], "unknown --device 'cuda:-1'"),
    (["--steps", "2000"], "bad respacing '2000'"),
    # DDIM's every-k-th spacing: the way out it suggests must work (--respacing 2000 would not)
    (["--sampler", "ddim", "--steps", "999"], "--respacing 999 spreads 999 steps evenly instead"),
    (["--sampler", "ddim", "--steps", "2000"], "the model has 1000 diffusion steps; give at most --steps 1000"),
    (["--sampler", "ddpm", "--eta", "0.5"], "ddpm ignores it"),
    (["--steps", "3", "--respacing", "2"], "--steps and --respacing"),
    (["--class", " , "], "names no class"),
])
def test_bad_values_fail_with_one_line(tmp_path, files, args, message):
    res, out = _sample(tmp_path, files, *args)
    assert res.exit_code == 2  # the input is wrong (1: the job failed on the way)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()


def test_bad_model_choices_fail_with_one_line(tmp_path, files, monkeypatch):
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "cache"))
    cases = [
        (["sample", "--res", "100", "--offline"], "--res 100", 2),
        (["sample", "--model", "256x256_difusion", "--offline"], "256x256_diffusion", 2),
        (["sample", "--weights", str(tmp_path / "missing.safetensors")], "missing.safetensors", 1),
        (["sample", "--res", "64", "--offline", "--out", str(tmp_path / "o")], "offline", 1),
    ]
    for args, message, code in cases:
        res = runner.invoke(app, args + ["--quiet"])
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == code and len(lines) == 1 and message in lines[0], (args, res.output)
    assert not (tmp_path / "o").exists()


def test_cuda_graph_flag_is_recorded_and_changes_no_image_off_cuda(tmp_path, files):
    """--cuda-graph is only a way to replay the same GPU work: on CPU it is ignored (the printed
    plan does not claim it), the images are byte-identical to a run without it, and run.json
    records that it was asked for (a --resume on CUDA goes on with it)."""
    extra = ["--sampler", "ddpm", "--steps", "3", "-n", "2", "--class", "207",
             "--classifier-weights", str(files["classifier"]), "--guidance", "2"]
    plain, out_plain = _sample(tmp_path, files, *extra, name="plain")
    graphed, out_graphed = _sample(tmp_path, files, *extra, "--cuda-graph", name="graphed")
    assert plain.exit_code == 0 and graphed.exit_code == 0, (plain.output, graphed.output)
    with np.load(out_plain / "samples.npz") as a, np.load(out_graphed / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert json.loads((out_graphed / "run.json").read_text())["cuda_graph"] is True
    assert json.loads((out_plain / "run.json").read_text())["cuda_graph"] is False
    loud = runner.invoke(app, ["sample", "--weights", str(files["unet"]), "--out", str(tmp_path / "loud"), "--seed",
                               "5", "--device", "cpu", "--steps", "2", "-n", "1", "--cuda-graph"])
    assert loud.exit_code == 0 and "device cpu, dtype" in loud.output and "CUDA graphs" not in loud.output, loud.output


def test_unwritable_output_folder(tmp_path, files):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["sample", "--weights", str(files["unet"]), "--out", str(blocker / "sub"),
                              "--steps", "2", "--quiet", "--device", "cpu"])
    assert res.exit_code != 0 and res.output.strip().startswith("error:") and "Traceback" not in res.output
    assert blocker.read_text() == "x"


def test_existing_run_is_never_overwritten(tmp_path, files):
    res, out = _sample(tmp_path, files, "--steps", "2", "-n", "1")
    assert res.exit_code == 0
    before = (out / "grid.png").read_bytes()
    again, _ = _sample(tmp_path, files, "--steps", "3", "-n", "1")
    assert again.exit_code != 0 and "already holds a run" in again.output
    assert (out / "grid.png").read_bytes() == before


def test_help_documents_every_option_with_default():
    res = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0
    text = res.output
    for opt in ["--res", "--model", "--class", "--num-samples", "--seed", "--sampler", "--steps", "--respacing",
                "--eta", "--guidance", "--classifier", "--weights", "--classifier-weights", "--config",
                "--upsample", "--batch-size", "--device", "--dtype", "--compile", "--cuda-graph", "--out", "--nrow",
                "--resume",
                "--offline", "--mirror", "--quiet"]:
        assert opt in text, opt
    assert "Default" in text and "auto" in text and "[default: 8]" in text.replace("  ", " ") or "default: 8" in text


def _loud(tmp_path, files, *extra, name="run", env=None):
    """Like _sample, without --quiet: the plan lines and the done line are printed."""
    out = tmp_path / name
    args = ["sample", "--weights", str(files["unet"]), "--out", str(out), "--seed", "5", "--device", "cpu", *extra]
    return runner.invoke(app, args, env=env), out


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_bad_out_and_respacing_fail_before_the_plan_is_printed(tmp_path, files):
    done, run = _sample(tmp_path, files, "--steps", "2", "-n", "1", name="done")
    assert done.exit_code == 0, done.output
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, message in [(["--out", str(afile)], "is not a folder"), (["--out", str(run)], "already holds a run"),
                           (["--respacing", "abc"], "bad respacing"), (["--steps", "2000"], "bad respacing")]:
        res, _ = _loud(tmp_path, files, *extra, name="fresh")
        assert message in _one_error_line(res), (extra, res.output)
    assert not (tmp_path / "fresh").exists() and afile.read_text() == "x"


@pytest.mark.parametrize("value", ["abc", "0", "\u00b2"])
def test_bad_cpu_batch_env_fails_before_anything_is_written(tmp_path, files, value):
    res, out = _loud(tmp_path, files, "--steps", "2", "-n", "1", env={"ADM_CPU_BATCH": value})
    assert "ADM_CPU_BATCH must be a positive integer" in _one_error_line(res)
    assert not out.exists()


def _finished_then_cut(tmp_path, files, *extra):
    """A finished 3-sample run turned back into one killed after samples 0 and 1."""
    res, out = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", *extra)
    assert res.exit_code == 0, res.output
    (out / "run.json").rename(out / "run-plan.json")
    for name in ("000002.png", "grid.png", "samples.npz"):
        (out / name).unlink()
    return out


def test_resume_refuses_samples_without_a_plan(tmp_path, files):
    out = _finished_then_cut(tmp_path, files)
    (out / "run-plan.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--class", "7", "--seed", "99", "--resume")
    assert "holds samples (" in _one_error_line(res) and "choose a new --out" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no plan written, nothing sampled
    # the base samples of an upsampled run live in base/: they count too
    (out / "base").mkdir()
    for png in list(out.glob("*.png")):
        png.rename(out / "base" / png.name)
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--resume")
    assert "holds samples (base/" in _one_error_line(res)
    (out / "base" / "000000.png").rename(out / "000000.png")
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3")  # no dead-end advice to pass --resume
    line = _one_error_line(res)
    assert "already holds a run (000000.png" in line and "pass --resume" not in line and "no run-plan.json" in line


@pytest.mark.parametrize("text,message", [("{", "choose a new --out"), ("[1, 2]", "not a JSON object")])
def test_resume_with_an_unreadable_plan_fails_with_one_line(tmp_path, files, text, message):
    out = _finished_then_cut(tmp_path, files)
    (out / "run-plan.json").write_text(text)
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--resume")
    line = _one_error_line(res)
    assert message in line and "remove it" not in line
    assert (out / "run-plan.json").read_text() == text and not (out / "000002.png").exists()


def test_resume_reports_what_it_computed_and_records_the_batch(tmp_path, files):
    out = _finished_then_cut(tmp_path, files, "--batch-size", "1")
    res, _ = _loud(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", "--resume", "--batch-size", "1")
    assert res.exit_code == 0, res.output
    assert "done: 1 images in" in res.output and "2 already there" in res.output
    run = json.loads((out / "run.json").read_text())
    assert run["batch_size"] == "1" and run["resolved_batch_size"] == {"base": 1} and run["computed"] == {"base": 1}
    res, auto = _loud(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", name="auto",
                      env={"ADM_CPU_BATCH": "2"})
    assert res.exit_code == 0 and "done: 3 images in" in res.output and "already there" not in res.output
    # the plan names the noise schedule and the steps it skips ('2' of the file's 1000, linear)
    assert "  sampler ddpm, respacing '2' (2 of 1000 steps, linear schedule)\n" in res.output
    run = json.loads((auto / "run.json").read_text())
    assert run["batch_size"] == "auto" and run["resolved_batch_size"] == {"base": 2}


def test_resume_with_auto_batch_computes_in_the_recorded_batches(tmp_path, files, monkeypatch):
    # auto gave 2 at first (here from ADM_CPU_BATCH, on a GPU from a measurement); a resume
    # where auto would now give 3 samples in the recorded batches of 2, as the uninterrupted run did
    monkeypatch.setenv("ADM_CPU_BATCH", "2")
    out = _finished_then_cut(tmp_path, files, "--batch-size", "auto")
    assert json.loads((out / "run-plan.json").read_text())["resolved_batch_size"] == {"base": 2}
    res, _ = _loud(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", "--resume", env={"ADM_CPU_BATCH": "3"})
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["resolved_batch_size"] == {"base": 2} and run["computed"] == {"base": 1}  # block [2], not [0, 1, 2]
    # a resume with nothing left to compute still reports the batches the samples were made in
    (out / "run.json").rename(out / "run-plan.json")
    (out / "grid.png").unlink()
    res, _ = _loud(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["resolved_batch_size"] == {"base": 2}


def test_resume_with_another_explicit_batch_records_both(tmp_path, files):
    out = _finished_then_cut(tmp_path, files, "--batch-size", "2")
    res, _ = _loud(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", "--resume", "--batch-size", "1")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["resolved_batch_size"] == {"base": [2, 1]}


def test_a_run_in_progress_holds_its_output_folder(tmp_path, files):
    out = _finished_then_cut(tmp_path, files)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with hold_run_dir(out):  # as a run in progress holds it
        res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", "--resume")
        assert "is in use by another adm sample run" in _one_error_line(res)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        with pytest.raises(OutputError, match="in use"):  # held until the end: also past the early check
            open_run_dir(out, json.loads((out / "run-plan.json").read_text()), resume=True, held=contextlib.ExitStack())
    seen = []

    def probe(*_):  # while this run samples, the folder is held
        with pytest.raises(OutputError, match="in use"), hold_run_dir(out):
            pass
        seen.append(1)

    plan = run_api.plan_run(run_api.SampleRequest(weights=files["unet"], out=out, resume=True, steps=2, num_samples=3,
                                                  classes="4", seed=5, device="cpu", batch_size="1"))
    run_api.execute(plan, progress=probe)
    assert seen and (out / "run.json").is_file()
    with hold_run_dir(out):  # and let go when it ends
        pass


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 1 bytes.")])
def test_running_out_of_memory_is_one_line_and_resumable(tmp_path, files, monkeypatch, error):
    real, calls = run_api.api.generate, []

    def generate(*args, **kwargs):  # the second batch does not fit
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(run_api.api, "generate", generate)
    res, out = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--batch-size", "2")
    line = _one_error_line(res)
    assert res.exit_code == 1 and "out of cpu memory sampling the base stage in batches of 2: pass a smaller --batch-size (or auto)" in line
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    monkeypatch.setattr(run_api.api, "generate", real)
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--batch-size", "2", "--resume")
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(run_api.api, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error is not mistaken for memory
        run_api.execute(run_api.plan_run(run_api.SampleRequest(weights=files["unet"], out=tmp_path / "bug", steps=2,
                                                               num_samples=1, seed=1, device="cpu")))


def test_highest_seed_runs_and_respacing_records_no_steps(tmp_path, files):
    res, out = _sample(tmp_path, files, "--respacing", "2", "-n", "2", "--seed", str(2 ** 63 - 2))
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 2 ** 63 - 2 and run["stages"][0]["steps"] is None and run["stages"][0]["respacing"] == "2"


def test_cuda_index_beyond_the_device_count(tmp_path, files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    res, out = _sample(tmp_path, files, "--device", "cuda:1")
    assert "this machine has 1 CUDA device(s)" in _one_error_line(res) and not out.exists()


def _same_run_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_resume_compares_weights_by_content_not_by_path(tmp_path, files):
    """A resume used to accept any file of the same name (mixing two models in one run) and to
    write the typed path into each PNG (a byte-identical copy elsewhere changed the files)."""
    from adm_cli.weights import load_model, read_config, save_weights

    whole, whole_out = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", name="whole")
    assert whole.exit_code == 0, whole.output
    copy_dir, other_dir = tmp_path / "copy", tmp_path / "other"
    copy_dir.mkdir()
    other_dir.mkdir()
    (copy_dir / "unet.safetensors").write_bytes(files["unet"].read_bytes())
    model = load_model(files["unet"])
    with torch.no_grad():
        model.out[2].weight.mul_(1.05)
    save_weights(other_dir / "unet.safetensors", model.state_dict(), read_config(files["unet"]))

    out = _finished_then_cut(tmp_path, files)
    args = ["sample", "--out", str(out), "--seed", "5", "--device", "cpu", "--quiet", "--steps", "2", "-n", "3",
            "--class", "4", "--resume"]
    res = runner.invoke(app, [*args, "--weights", str(other_dir / "unet.safetensors")])
    assert res.exit_code == 2 and "weights_sha256" in res.output and "--resume" in res.output, res.output
    res = runner.invoke(app, [*args, "--weights", str(copy_dir / "unet.safetensors")])
    assert res.exit_code == 0, res.output
    _same_run_files(whole_out, out, ["000000.png", "000001.png", "000002.png", "grid.png", "samples.npz"])
    with Image.open(out / "000002.png") as im:
        settings = json.loads(im.text["settings"])
    stage = settings["stages"][0]
    assert stage["model"] == "unet.safetensors" and len(stage["weights_sha256"]) == 64
    assert "weights" not in stage and str(tmp_path) not in json.dumps(settings)
    run = json.loads((out / "run.json").read_text())
    assert run["stages"][0]["weights_sha256"] == stage["weights_sha256"]


def test_resume_refuses_another_grid_layout(tmp_path, files):
    out = _finished_then_cut(tmp_path, files)
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--resume", "--nrow", "1")
    assert res.exit_code == 2 and "nrow" in _one_error_line(res)


def test_resume_removes_only_its_own_temporary_files(tmp_path, files):
    out = _finished_then_cut(tmp_path, files)
    ours = [out / ".000002.png.0123456789ab.incomplete", out / ".samples.npz.fedcba987654.incomplete"]
    theirs = [out / "project" / ".video.mp4.incomplete", out / "project" / "deep" / ".notes.txt.0123456789ab.incomplete",
              out / ".draft.incomplete"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--resume")
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


def test_finalize_streams_the_npz_and_caps_the_grid(tmp_path, monkeypatch):
    """samples.npz is written image by image (the old code held ~5.5x the images in memory) and
    grid.png shows the first GRID_MAX samples; finalizing again keeps identical files."""
    import tracemalloc

    from adm_cli import outputs

    monkeypatch.setattr(outputs, "GRID_MAX", 5)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 48, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 400)
    writer = outputs.SampleWriter(tmp_path, {"seed": "0"})
    writer.write_batch(range(400), images, labels)
    tracemalloc.start()
    try:
        writer.finalize(400, {"seed": 0}, nrow=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 2, (peak, images.nbytes)  # the images are 2.8 MB
    with np.load(tmp_path / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], images) and npz["arr_1"].tolist() == labels.tolist()
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (5 * 50 + 2, 1 * 50 + 2)
        grid = np.asarray(im.convert("RGB"))
    assert np.array_equal(grid[2:50, 2 + 4 * 50:2 + 4 * 50 + 48], images[4])
    before = {name: (tmp_path / name).read_bytes() for name in ("samples.npz", "grid.png")}
    (tmp_path / "run.json").unlink()  # as if killed before run.json: a resume finalizes again
    writer.finalize(400, {"seed": 0}, nrow=5)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_unconditional_samples_have_no_label_array(tmp_path, files):
    res, out = _sample(tmp_path, files, "--steps", "2", "-n", "2", model="uncond")
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz") as npz:
        assert npz.files == ["arr_0"] and npz["arr_0"].shape == (2, 16, 16, 3)


# --- a user's walk through the README: each case once gave a traceback, a wrong result or a stuck folder

def test_networks_in_the_wrong_role_or_of_another_shape_are_refused_before_anything_is_written(tmp_path, files):
    other = tmp_path / "clf8.safetensors"  # a classifier of another image size
    model = randomize(build_model(CLASSIFIER.replace(image_size=8)), seed=3, std=0.02)
    torch.save(model.state_dict(), tmp_path / "clf8.pt")
    (tmp_path / "clf8.json").write_text(json.dumps(_flags(CLASSIFIER.replace(image_size=8))))
    assert runner.invoke(app, ["convert-weights", str(tmp_path / "clf8.pt"), str(other),
                               "--config", str(tmp_path / "clf8.json")]).exit_code == 0
    for extra, message in (
        (["--weights", str(files["classifier"])], "holds a classifier, not a diffusion model"),
        (["--classifier-weights", str(files["uncond"]), "--guidance", "1"], "holds a diffusion model, not a classifier"),
        (["--classifier-weights", str(other), "--guidance", "1"], "its image size is 8, the model's 16"),
    ):
        res, out = _sample(tmp_path, files, "--steps", "2", "-n", "1", *extra)
        assert message in _one_error_line(res) and not out.exists(), res.output


def test_registry_classifier_that_cannot_guide_the_model_is_refused_before_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "cache"))  # empty: a download would be needed
    res = runner.invoke(app, ["sample", "--model", "demo-digits-uncond", "--classifier", "128x128_classifier",
                              "--offline", "-n", "1", "--out", str(tmp_path / "run")])
    assert "its image size is 128, the model's 32" in _one_error_line(res)
    assert not (tmp_path / "cache" / "128x128_classifier").exists()


def test_options_that_would_be_ignored_are_refused(tmp_path, files):
    for extra, message in (
        (["--classifier-weights", str(files["classifier"])], "--classifier-weights goes with --weights"),
        (["--config", str(tmp_path / "x.json")], "--config goes with --weights"),
    ):
        res = runner.invoke(app, ["sample", "--model", "demo-digits", "-n", "1", "--out", str(tmp_path / "r"), *extra])
        assert message in _one_error_line(res)


def test_upsample_refuses_a_base_model_the_upsampler_cannot_take_before_a_download(tmp_path, monkeypatch):
    """--upsample conditions the upsampler on the base model's images and labels: a --model of
    another size is refused in one line before anything is fetched (a fitting one gets as far as
    the fetch, here refused offline); unconditional or other-class bases likewise."""
    import dataclasses

    from adm_cli.registry import load_registry

    monkeypatch.setenv("ADM_HOME", str(tmp_path / "cache"))  # empty: anything used would be fetched
    for model, res, message in (("demo-digits", "256", "--upsample to 256 starts from 64x64 images; "
                                                       "--model demo-digits makes 32x32 ones"),
                                ("256x256_diffusion", "256", "makes 256x256 ones"),
                                ("64x64_diffusion", "512", "--upsample to 512 starts from 128x128 images"),
                                ("64x64_classifier", "256", "holds no diffusion model")):
        res_ = runner.invoke(app, ["sample", "--res", res, "--upsample", "--model", model, "--offline", "-n", "1",
                                   "--out", str(tmp_path / "run")])
        assert message in _one_error_line(res_), (model, res_.output)
    res_ = runner.invoke(app, ["sample", "--res", "256", "--upsample", "--model", "64x64_diffusion", "--offline",
                               "-n", "1", "--out", str(tmp_path / "run")])
    assert "offline" in _one_error_line(res_)  # past the check: the fetch is what stops it
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").rglob("*.safetensors"))
    registry = load_registry()
    up = registry.get("64_256_upsampler")
    base = registry.get("64x64_diffusion")
    request_api._check_upsampler_base(base, up)
    for other, message in ((dataclasses.replace(base, class_cond=False), "is unconditional"),
                           (dataclasses.replace(base, num_classes=10), "is conditioned on 10 classes")):
        with pytest.raises(UsageError, match=message):
            request_api._check_upsampler_base(other, up)


def test_offline_names_every_missing_file_of_the_run_at_once(tmp_path, monkeypatch):
    """--upsample with guidance uses three registry files: offline, one line names all that are
    missing (in the order the run uses them) and the one fetch command for them; one already in
    the cache is left out. Nothing is written to the cache."""
    from adm_cli.cache import raw_path
    from adm_cli.registry import load_registry

    monkeypatch.setenv("ADM_HOME", str(tmp_path / "cache"))
    args = ["sample", "--res", "256", "--upsample", "--offline", "-n", "1", "--out", str(tmp_path / "run")]
    line = _one_error_line(res := runner.invoke(app, args))
    assert res.exit_code == 1
    assert line.startswith("error: 64x64_diffusion, 64x64_classifier, 64_256_upsampler are not in the cache")
    assert line.endswith("run `adm fetch 64x64_diffusion 64x64_classifier 64_256_upsampler` with network access")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    cached = raw_path(load_registry().get("64x64_classifier"))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not checked until it is used")
    line = _one_error_line(runner.invoke(app, args))
    assert "error: 64x64_diffusion, 64_256_upsampler are not" in line and "classifier" not in line
    line = _one_error_line(runner.invoke(app, [*args, "--guidance", "0"]))  # no classifier used: two names
    assert "error: 64x64_diffusion, 64_256_upsampler are not" in line


def test_weights_res_and_classifier_options_are_checked_not_ignored(tmp_path, files, monkeypatch):
    """With --weights, --res must be the file's size (any size: a custom model need not be one of
    the registry's) and --classifier (a registry name) is refused; with a registry --model, a
    --classifier is checked even at guidance 0, where it goes unused."""
    res, out = _sample(tmp_path, files, "--res", "64", "--steps", "2", "-n", "1")
    assert "makes 16x16 images, not --res 64" in _one_error_line(res) and not out.exists()
    res, out = _sample(tmp_path, files, "--res", "16", "--steps", "2", "-n", "1", name="ok")
    assert res.exit_code == 0 and (out / "000000.png").is_file(), res.output
    res, out = _sample(tmp_path, files, "--classifier", "demo-digits-classifier", "--steps", "2", "-n", "1",
                       name="clf")
    assert "with --weights pass the file with --classifier-weights" in _one_error_line(res) and not out.exists()
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "cache"))
    for classifier, message in (("nope", "nope"), ("demo-digits-uncond", "holds a diffusion model, not a classifier")):
        res = runner.invoke(app, ["sample", "--model", "demo-digits", "--classifier", classifier, "--guidance", "0",
                                  "-n", "1", "--steps", "2", "--out", str(tmp_path / "r")])
        assert message in _one_error_line(res), res.output
    res = runner.invoke(app, ["sample", "--model", "demo-digits", "--classifier", "demo-digits-classifier",
                              "--guidance", "0", "-n", "1", "--steps", "2", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and "(no guidance)" in res.output, res.output


def test_raw_weights_of_an_unknown_architecture_name_what_adm_sample_takes(tmp_path, files, monkeypatch):
    """adm sample has no --arch: for a raw checkpoint that is not in the registry, the error
    points to --config or to converting it first with --arch (convert-weights has it)."""
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "cache"))
    pt = tmp_path / "mine.pt"
    pt.write_bytes(files["unet"].with_suffix(".pt").read_bytes())
    res = runner.invoke(app, ["sample", "--weights", str(pt), "-n", "1", "--steps", "2", "--out", str(tmp_path / "r")])
    line = _one_error_line(res)
    assert "pass --config FILE" in line and f"adm convert-weights {pt} --arch PRESET" in line, line
    assert "pass --arch" not in line and not (tmp_path / "r").exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("out,message", [("", "--out is empty"), ("afile/sub", "afile is not a folder"),
                                         ("dangling", "is a symbolic link to nowhere, which does not exist")])
def test_an_out_that_cannot_be_created_fails_first(tmp_path, files, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to("nowhere")
    res = runner.invoke(app, ["sample", "--weights", str(files["unet"]), "--out", out, "--steps", "2", "-n", "1"])
    assert message in _one_error_line(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling"]


def test_an_unusable_default_out_fails_first(tmp_path, files, monkeypatch):
    """Without --out the run goes to a new folder under ./samples: a file of that name is refused
    in one line before the plan is printed, saying the folder was the default."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").write_text("x")
    res = runner.invoke(app, ["sample", "--weights", str(files["unet"]), "--steps", "2", "-n", "1"])
    line = _one_error_line(res)
    assert "samples is not a folder" in line and "the default output folder: pass --out DIR" in line, line
    assert (tmp_path / "samples").read_text() == "x"


def test_no_mps_device_is_one_line_and_leaves_no_plan(tmp_path, files, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    res = runner.invoke(app, ["sample", "--weights", str(files["unet"]), "--device", "mps", "--out",
                              str(tmp_path / "m"), "-n", "1"])
    assert "no MPS device" in _one_error_line(res) and not (tmp_path / "m").exists()


def test_a_damaged_sample_is_named_at_the_end(tmp_path, files):
    out = _finished_then_cut(tmp_path, files)
    (out / "000001.png").write_bytes((out / "000001.png").read_bytes()[:100])
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", "--resume")
    line = _one_error_line(res)
    assert "000001.png is damaged" in line and "delete it and rerun with --resume" in line
    assert not (out / "samples.npz").exists() and not list(out.glob(".*incomplete"))
    (out / "000001.png").unlink()
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--class", "4", "--resume")
    assert res.exit_code == 0 and (out / "samples.npz").is_file()


def test_resume_accepts_the_same_weights_under_another_name(tmp_path, files):
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(files["unet"].read_bytes())
    out = _finished_then_cut(tmp_path, files)
    first = Image.open(out / "000000.png").text
    res = runner.invoke(app, ["sample", "--weights", str(copy), "--out", str(out), "--seed", "5", "--device", "cpu",
                              "--quiet", "--steps", "2", "-n", "3", "--class", "4", "--resume"])
    assert res.exit_code == 0, res.output
    assert Image.open(out / "000002.png").text["settings"] == first["settings"]  # the recorded name, kept
    # (other content under any name is refused: test_resume_compares_weights_by_content_not_by_path)


def test_a_changed_seed_is_named_on_resume(tmp_path, files):
    out = _finished_then_cut(tmp_path, files)
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "3", "--resume", "--seed", "6")
    assert "started with seed = 5, this command gives 6" in _one_error_line(res)
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "4", "--class", "4", "--resume")
    assert "started with num_samples = 3, this command gives 4" in _one_error_line(res)


def test_resume_of_nothing_says_so_and_blank_class_is_random(tmp_path, files):
    res, out = _loud(tmp_path, files, "--steps", "2", "-n", "2", "--resume", "--class", "")
    assert res.exit_code == 0, res.output
    assert "nothing to resume in" in res.output and "classes random" in res.output
    assert json.loads((out / "run.json").read_text())["labels"] is not None


def test_values_that_are_no_image_fail_instead_of_writing_black(tmp_path, files):
    res, out = _sample(tmp_path, files, "--steps", "2", "-n", "2", "--classifier-weights", str(files["classifier"]),
                       "--guidance", "1e308")
    assert "NaN or infinite" in _one_error_line(res) and not list(out.glob("*.png"))


def test_convert_refuses_an_output_name_the_readers_would_misread(tmp_path, files):
    res = runner.invoke(app, ["convert-weights", str(files["unet"].with_suffix(".pt")), str(tmp_path / "y.pt"),
                              "--config", str(files["unet"].with_suffix(".json"))])
    assert "must end in .safetensors" in _one_error_line(res) and not (tmp_path / "y.pt").exists()


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip().startswith("adm-cli ")


# -- refused before any download (session 17's audit) -------------------------------------------


@pytest.fixture
def dead_registry(tmp_path, monkeypatch):
    """Registry entries whose URLs nothing answers: a check that comes after the fetch fails
    with a download error instead of its own line."""
    from publishers import inline_roles

    dead = "http://127.0.0.1:9/"
    (tmp_path / "registry.toml").write_text(
        f'["plain"]\npublisher = "openai"\nurls = ["{dead}plain.pt"]\n{inline_roles(unet="lsun")}\n'
        'noise_schedule = "linear"\nresolution = 32\nclass_cond = false\n\n'
        f'["up"]\npublisher = "openai"\nurls = ["{dead}up.pt"]\n{inline_roles(unet="64_256_upsampler")}\n'
        'noise_schedule = "linear"\nresolution = 256\nupsampler_base = 64\nclass_cond = true\n')
    monkeypatch.setenv("ADM_REGISTRY", str(tmp_path / "registry.toml"))
    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["--model", "plain", "--guidance", "1"], "--guidance 1 needs a classifier and plain has none in the registry"),
    (["--model", "up"], "up is an upsampler (64x64 images to 256x256): `adm sample --res 256 --upsample`"),
])
def test_refused_before_any_download(dead_registry, args, message):
    out = dead_registry / "out"
    res = runner.invoke(app, ["sample", *args, "-n", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and message in _one_error_line(res), res.output
    assert not out.exists() and not (dead_registry / "home").exists()


def test_an_upsampler_file_alone_is_refused(tmp_path, monkeypatch):
    from publishers import small

    monkeypatch.setenv("ADM_HOME", str(tmp_path / "home"))

    model = randomize(build_model(small("64_256_upsampler")), seed=1, std=0.02)
    torch.save(model.state_dict(), tmp_path / "up.pt")
    (tmp_path / "up.json").write_text(json.dumps(_flags(small("64_256_upsampler"))))
    res = runner.invoke(app, ["sample", "--weights", str(tmp_path / "up.pt"), "--config", str(tmp_path / "up.json"),
                              "--out", str(tmp_path / "out"), "-n", "1", "--quiet"])
    last = res.output.strip().splitlines()[-1]  # after the conversion's "wrote ..." line
    assert res.exit_code == 2 and last.startswith("error: --weights") and "is an upsampler" in last, res.output
    assert not (tmp_path / "out").exists()


def test_more_classes_than_samples_is_refused(tmp_path, files):
    res, out = _sample(tmp_path, files, "--class", "1,2,3", "-n", "2")
    assert "--class lists 3 classes but -n is 2" in _one_error_line(res) and not out.exists()


def test_a_read_only_out_folder_is_refused_before_the_plan(tmp_path, files, monkeypatch):
    import os as os_mod

    out = tmp_path / "ro"
    out.mkdir()
    real = os_mod.access
    monkeypatch.setattr(os_mod, "access", lambda p, mode, **k: False if str(p) == str(out) else real(p, mode, **k))
    res, _ = _loud(tmp_path, files, "--steps", "2", "-n", "1", name="ro")
    assert f"--out {out} is not writable" in _one_error_line(res)


def test_a_run_that_fails_before_any_sample_leaves_nothing(tmp_path, files, monkeypatch):
    """A NaN, out of memory or an early Ctrl-C left run-plan.json, and the same command was then
    told the folder already holds a run."""
    from adm_cli import api

    def broken(*args, **kwargs):
        raise SamplingError("sampling produced NaN")

    monkeypatch.setattr(api, "generate", broken)
    res, out = _sample(tmp_path, files, "--steps", "2", "-n", "1")
    assert res.exit_code == 1 and "NaN" in res.output and not out.exists()
    out.mkdir()  # a folder given that existed: kept, emptied of what the run wrote
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "1")
    assert res.exit_code == 1 and sorted(out.iterdir()) == []
    monkeypatch.undo()
    res, _ = _sample(tmp_path, files, "--steps", "2", "-n", "1")
    assert res.exit_code == 0, res.output
