"""benchmarks/bench.py runs end to end in its small CPU mode (what CI can afford)."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_small_benchmark_prints_every_case(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--cpu-small", "--device", "cpu",
         "--repeats", "1", "--steps", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    rows = [line.split("|")[1].strip() for line in lines[header + 2:] if line.startswith("|")]
    assert rows == ["ddpm-512-guided", "ddpm-64-guided", "ddim-256"]
    assert "ours TFLOP/s (%peak)" in lines[header] and "speedup" in lines[header]
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu-small" and [r["case"] for r in data["rows"]] == rows
    for r in data["rows"]:
        assert r["ours_ms"] > 0 and r["ref_ms"] > 0 and r["gflop_per_step"] > 0
        assert r["ours_peak_mib"] is None and r["ours_peak_frac"] is None  # CPU: n/a


def test_accuracy_script_small_cpu(tmp_path):
    """benchmarks/accuracy.py in its small CPU mode: bfloat16 against the reference's float32."""
    out = tmp_path / "acc.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "accuracy.py"), "--device", "cpu", "--small",
         "--models", "64", "--dtypes", "bfloat16", "--steps", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    # bfloat16 keeps 8 mantissa bits: ~2^-9 per rounding, a few 1e-3 to 1e-2 after a network.
    assert 1e-4 < row["eps_rel"] < 3e-2 and row["clf_grad_rel"] < 6e-2, row
    assert row["uint8_p99"] <= 10, row
    assert "| 64x64_diffusion (small) | bfloat16 |" in proc.stdout


def test_kernel_geometry_script_runs_and_restores_the_geometry(monkeypatch):
    """benchmarks/kernels.py on a shrunk case in Triton's interpreter: a row per setting, and
    the shipped launch geometry back in place afterwards (also after a bad setting)."""
    import dataclasses

    import pytest

    from test_fused import _kernel_device

    if _kernel_device() is None:
        pytest.skip("no Triton (or no working interpreter)")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench
    import kernels

    from adm_cli import fused

    case = bench.CASES["ddim-256"]
    tiny = dict(case.small, image_size=8, channel_mult="1", attention_resolutions="4")
    monkeypatch.setitem(bench.CASES, "ddim-256", dataclasses.replace(case, small=tiny))
    shipped = fused._TILE, fused._WARPS, fused._PROGRAMS_PER_SM, fused._STATS_PREFETCH
    rows = kernels.main(["--cases", "ddim-256", "--batch", "1", "--repeats", "1", "--settings", "4096:4:4,1024:2:1:p"])
    assert [r["setting"] for r in rows] == ["4096:4:4", "1024:2:1:p"]
    assert all(r["ms"] > 0 and r["case"] == "ddim-256" for r in rows)
    assert (fused._TILE, fused._WARPS, fused._PROGRAMS_PER_SM, fused._STATS_PREFETCH) == shipped
    for bad in ("4096:4", "4096:4:4:q", "4096:4:4:p:p"):
        with pytest.raises(SystemExit, match="TILE:WARPS:PPS"):
            kernels.main(["--settings", bad])
    with pytest.raises(SystemExit, match="powers of two"):
        kernels.main(["--settings", "3000:4:4"])


def test_host_overhead_script_stubs_and_restores_the_launches(monkeypatch):
    """benchmarks/host.py: one row per op, no kernel actually launched, launcher restored."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import host

    from adm_cli import fused

    launcher = fused._launch
    rows = host.main(["--batch", "2", "--channels", "64"])
    assert list(rows) == ["norm, sampling (no grad)", "norm, forward + input gradient", "residual add"]
    assert all(0 < us < 1e5 for us in rows.values())
    assert fused._launch is launcher


def test_host_step_script_runs_the_fused_path_everywhere_and_restores_what_it_stubs(monkeypatch):
    """benchmarks/host.py --step: a whole guided 64x64 step (full-size networks, 8x8 images) on the
    fused path with launches, convolutions, GEMMs and attention stubbed; every norm and every
    closing residual add launched its kernels (no unfused fallback), and everything is restored."""
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import host

    from adm_cli import fused

    def stubbed():
        return (fused._launch, fused.gemm_runs, F.conv2d, F.linear, F.scaled_dot_product_attention,
                torch.Tensor.addmm_, torch.Tensor.__matmul__, F.conv_transpose2d)

    from adm_cli import layers

    real = stubbed()
    shared = host.main(["--step", "ddpm-64-guided", "--batch", "2", "--steps", "2", "--repeats", "1"])
    monkeypatch.setattr(layers, "SHARED_STATS", False)  # (every norm then launches its statistics kernel)
    row = host.main(["--step", "ddpm-64-guided", "--batch", "2", "--steps", "2", "--repeats", "1"])
    assert stubbed() == real
    # Each norm: stats, finalize, apply; the classifier's again backward; each residual block: one
    # add; the U-Net's input conv (the direct one: no gradient taken through it, unlike the classifier's).
    want = 3 * row["norms"] + 3 * row["classifier norms"] + row["residual blocks"] + 1
    assert row["launch calls per step"] == want
    # with the statistics shared, fewer elements read; no more launches (fewer where an op that
    # takes its output's statistics tiles the images, which 8x8 ones are too small for, or with
    # layers.RESIDUAL_STATS, off by default)
    assert shared["launch calls per step"] <= want
    assert shared["statistics elements read per step"] < row["statistics elements read per step"]
    assert row["conv calls per step"] > 100 and row["attention calls per step"] > 0
    assert row["statistics elements read per step"] > 0
    assert 0 < row["host ms per step"] < 10_000


def test_host_step_script_compares_another_build_in_the_same_process(monkeypatch, capsys):
    """--against SRC imports a second adm_cli under another name and alternates the two; here
    against this very tree, so the two must launch the same kernels and take similar time."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import host

    row = host.main(["--step", "ddim-64", "--batch", "1", "--steps", "2", "--repeats", "3",
                     "--against", os.path.join(ROOT, "src")])
    out = capsys.readouterr().out
    assert out.count("Triton launches") == 2
    launches = [line.split("per step ")[1].split(" Triton")[0] for line in out.splitlines() if "Triton" in line]
    assert launches[0] == launches[1] and int(launches[0]) > 100
    assert 0.2 < row["against / this tree"] < 5


def test_single_op_script_runs_every_form_and_restores_the_tiles(monkeypatch, tmp_path):
    """benchmarks/ops.py --small: a row per form of each op (skip GEMM at two tilings, the second
    with the decoder's two inputs in one K loop, the residual
    add's statistics at two geometries, alone and with the next norm, the statistics kernel's
    loop at three settings, the three up-block forms,
    the input conv's five and the output conv's two), every form agreeing with the plainest one
    (float32, Triton's interpreter), and the shipped tiles and geometries back in place."""
    import pytest

    from test_fused import _kernel_device

    if _kernel_device() is None:
        pytest.skip("no Triton (or no working interpreter)")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import ops

    from adm_cli import fused

    def tiles():
        return (fused._GEMM_M, fused._GEMM_N, fused._GEMM_K, fused._GEMM_WARPS, fused._GEMM_STAGES,
                fused._GEMM_ONE_LOOP, fused._CONV_IN_N,
                fused._CONV_IN_WARPS, fused._RESIDUAL_STATS_ROWS, fused._RESIDUAL_STATS_TILE,
                fused._RESIDUAL_STATS_WARPS, fused._LOOP_STAGES, fused._PROGRAMS_PER_SM)

    shipped = tiles()
    out = tmp_path / "ops.json"
    assert ops.main(["--small", "--repeats", "1", "--tiles", "128:128:64:4:3,64:32:16:4:2:1", "--groups",
                     "skip,add,addnorm,stats,up,in,out", "--add-stats", "128:4096:4,16:1024:4",
                     "--stats-loops", "3:4,1:4,1:64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    forms = {(r["group"], r["form"]) for r in rows}
    assert forms == {("skip", "gemms+add"), ("skip", "skip_add 128:128:64:4:3"), ("skip", "skip_add 64:32:16:4:2:1"),
                     ("skip", "skip_add +stats"), ("skip", "(stats pass over y)"), ("add", "add"),
                     ("add", "add +stats 128:4096:4"), ("add", "add +stats 16:1024:4"), ("add", "(stats pass over y)"),
                     ("addnorm", "add, norm"), ("addnorm", "add +stats 128:4096:4, norm"),
                     ("addnorm", "add +stats 16:1024:4, norm"), ("stats", "stats 1:4"), ("stats", "stats 3:4"),
                     ("stats", "stats 1:64"), ("up", "plain"), ("up", "transposed"), ("up", "folded"),
                     ("in", "cuDNN + bias"),
                     ("in", "conv_in"), ("in", "direct N:W 128:8"), ("in", "direct N:W 128:4"),
                     ("in", "direct N:W 64:4"), ("in", "direct +stats"), ("in", "(stats pass over y)"),
                     ("out", "cuDNN + bias"), ("out", "conv_out")}
    assert all(r["ms"] > 0 and r["diff"] <= 1e-5 for r in rows)
    assert {r["shape"] for r in rows if r["group"] == "skip"} >= {"4^2 32+0->64", "8^2 32+32->32"}
    # the statistics kernel's inputs, recorded from a forward: the second norms' (with the
    # embedding's per-sample bias) among them, the decoder's [h; skip] not (each half's statistics
    # come from the op that wrote it, or are kept from the encoder's norm)
    stats = {r["shape"]: r["calls"] for r in rows if r["group"] == "stats" and r["form"] == "stats 1:4"}
    assert "8^2 32 +bias" in stats and "4^2 64 +bias" in stats and not any("+" in k.split()[1] for k in stats), stats
    assert tiles() == shipped


def test_tunables_parse_set_and_restore(monkeypatch, capsys):
    """benchmarks/tunables.py: the command-line forms of fused's tunables, refused in one line when
    malformed (ops.py and bench.py exit 2 with that line), set and restored around a block."""
    import pytest

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import tunables

    from adm_cli import fused

    assert tunables.gemm("64:32:16:8:2:1") == dict(_GEMM_M=64, _GEMM_N=32, _GEMM_K=16, _GEMM_WARPS=8,
                                                     _GEMM_STAGES=2, _GEMM_ONE_LOOP=True)
    assert tunables.gemm("128:128:64:4:3")["_GEMM_ONE_LOOP"] is False
    assert tunables.add_stats("16:8192:8") == dict(_RESIDUAL_STATS_ROWS=16, _RESIDUAL_STATS_TILE=8192,
                                                   _RESIDUAL_STATS_WARPS=8)
    for bad in ("128:128:64", "128:128:64:4:3:2", "128:0:64:4:3", "a:b:c:d:e"):
        with pytest.raises(ValueError, match="M:N:K:WARPS:STAGES"):
            tunables.gemm(bad)
    for bad in ("16:4096", "16:-1:4", "0:4096:4"):
        with pytest.raises(ValueError, match="ROWS:TILE:WARPS"):
            tunables.add_stats(bad)
    assert tunables.stats_loop("3:5") == dict(_LOOP_STAGES=3, _PROGRAMS_PER_SM=5)
    for bad in ("3", "0:4", "3:4:1", "a:4"):
        with pytest.raises(ValueError, match="STAGES:PPS"):
            tunables.stats_loop(bad)
    shipped = (fused._GEMM_M, fused._GEMM_ONE_LOOP, fused._RESIDUAL_STATS_ROWS)
    with tunables.tuned({**tunables.gemm("64:32:16:8:2:1"), **tunables.add_stats("16:8192:8")}):
        assert (fused._GEMM_M, fused._GEMM_ONE_LOOP, fused._RESIDUAL_STATS_ROWS) == (64, True, 16)
    assert (fused._GEMM_M, fused._GEMM_ONE_LOOP, fused._RESIDUAL_STATS_ROWS) == shipped
    import bench
    import ops

    for main, argv in ((bench.main, ["--skip-gemm", "128:128:64"]), (bench.main, ["--add-stats", "16"]),
                       (bench.main, ["--variant", "picks"]), (bench.main, ["--variant", "a=--skip-gemm 1:2"]),
                       (bench.main, ["--variant", "a=--dtype float32"]), (bench.main, ["--stats-loop", "3"]),
                       (bench.main, ["--variant", "a=--stats-loop 0:4"]),
                       (ops.main, ["--small", "--tiles", "1:2:3:4:5:6"]),
                       (ops.main, ["--small", "--stats-loops", "2:0"])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and "want" in err[-1] and "Traceback" not in "".join(err), err
    assert (fused._GEMM_M, fused._GEMM_ONE_LOOP, fused._RESIDUAL_STATS_ROWS) == shipped


def test_tunables_picks_what_beats_the_shipped_form(monkeypatch, tmp_path):
    """gpu_session.sh's picks from ops.py's rows: per form, time x calls summed over the shapes;
    a candidate wins only by the margin, the "+stats" and failed rows never; the command line
    joins the rows of several files and skips one that a cut-short call left missing."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import tunables

    def rows(gemm_ms, add_ms):
        return [dict(group="skip", form="skip_add 128:128:64:4:3", ms=1.0, calls=3, shape="a"),
                dict(group="skip", form="skip_add 128:128:64:4:3", ms=2.0, calls=1, shape="b"),
                dict(group="skip", form="skip_add 64:128:32:4:4:1", ms=gemm_ms, calls=3, shape="a"),
                dict(group="skip", form="skip_add 64:128:32:4:4:1", ms=2.0, calls=1, shape="b"),
                dict(group="skip", form="skip_add +stats", ms=0.01, calls=3, shape="a"),
                dict(group="skip", form="gemms+add", ms=0.01, calls=3, shape="a"),
                dict(group="skip", form="skip_add 256:128:64:8:3:1", error="RuntimeError: out of resources"),
                dict(group="addnorm", form="add, norm", ms=2.0, calls=2, shape="a"),
                dict(group="addnorm", form="add +stats 16:8192:8, norm", ms=add_ms, calls=2, shape="a"),
                dict(group="addnorm", form="add +stats 128:4096:4, norm", ms=3.0, calls=2, shape="a"),
                dict(group="add", form="add", ms=0.01, calls=1, shape="a")]

    def loops(ms):  # the statistics loop: 1:4 (the shipped one) and two candidates
        return [dict(group="stats", form="stats 1:4", ms=1.0, calls=4, shape="a"),
                dict(group="stats", form="stats 1:4", ms=0.5, calls=2, shape="b"),
                dict(group="stats", form="stats 3:4", ms=ms, calls=4, shape="a"),
                dict(group="stats", form="stats 3:4", ms=0.5, calls=2, shape="b"),
                dict(group="stats", form="stats 2:5", ms=1.5, calls=4, shape="a"),
                dict(group="stats", form="stats 4:4", error="RuntimeError: out of resources")]

    monkeypatch.setattr(tunables.fused, "_LOOP_STAGES", 1)
    monkeypatch.setattr(tunables.fused, "_PROGRAMS_PER_SM", 4)
    # 5 against 3 * 0.9 + 2 = 4.7 (6% less); 2 * 1.5 against 2 * 2; 5 against 4 * 0.9 + 1 = 4.6
    assert tunables.picks(rows(0.9, 1.5) + loops(0.9)) == ("--skip-gemm 64:128:32:4:4:1",
                                                           "--set RESIDUAL_STATS=on --add-stats 16:8192:8",
                                                           "--stats-loop 3:4")
    assert tunables.picks(rows(0.97, 1.99) + loops(0.97)) == ("", "", "")  # 4.91 vs 5, 3.98 vs 4, 4.88 vs 5
    assert tunables.picks([r for r in rows(0.9, 1.5) if r["form"] != "add, norm"])[1] == ""
    monkeypatch.setattr(tunables.fused, "_LOOP_STAGES", 3)  # the shipped form is whatever fused has
    assert tunables.picks(loops(0.9))[2] == ""  # 3:4 (4.6) shipped: 1:4 (5) and 2:5 (8) lose
    monkeypatch.setattr(tunables.fused, "_LOOP_STAGES", 1)
    (tmp_path / "add.json").write_text(json.dumps({"rows": rows(0.9, 1.5)[7:] + loops(0.9)}))
    (tmp_path / "skip.json").write_text(json.dumps({"rows": rows(0.9, 1.5)[:7]}))
    run = lambda *names: subprocess.run(  # noqa: E731
        [sys.executable, os.path.join(ROOT, "benchmarks", "tunables.py"), *(str(tmp_path / n) for n in names)],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))).stdout.strip()
    assert run("add.json", "skip.json") == ("--skip-gemm 64:128:32:4:4:1|--set RESIDUAL_STATS=on "
                                            "--add-stats 16:8192:8|--stats-loop 3:4")
    assert run("add.json", "missing.json") == "|--set RESIDUAL_STATS=on --add-stats 16:8192:8|--stats-loop 3:4"


def test_bench_variant_runs_in_its_setting_with_graphs_of_its_own(monkeypatch):
    """bench.py --variant: each run of the variant has its switches and tunables set and the
    networks' graph captures of its own (a graph replays what it captured), kept between its
    runs; after each, the run's own setting and captures are back."""
    import torch

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench

    from adm_cli import fused, graphs, layers

    def setting():
        return (layers.RESIDUAL_STATS, fused._GEMM_ONE_LOOP, fused._GEMM_M, fused._RESIDUAL_STATS_ROWS,
                fused._LOOP_STAGES, fused._PROGRAMS_PER_SM)

    net = torch.nn.Linear(1, 1)
    graphs._captures(net)["unet"] = "the run's own"
    seen = []

    def run():
        seen.append((setting(), dict(graphs._captures(net))))
        graphs._captures(net)["unet"] = f"captured by call {len(seen)}"

    shipped = setting()
    v = bench.Variant("x=--set RESIDUAL_STATS=on --skip-gemm 64:32:16:4:2:1 --add-stats 16:8192:8 --stats-loop 3:5")
    wrapped = v.wrap(run, [net, None])
    wrapped()
    assert setting() == shipped and graphs._captures(net) == {"unet": "the run's own"}
    wrapped()
    assert seen[0] == ((True, True, 64, 16, 3, 5), {})  # no graph of the run's own setting replayed
    assert seen[1] == ((True, True, 64, 16, 3, 5), {"unet": "captured by call 1"})
    assert setting() == shipped and graphs._captures(net) == {"unet": "the run's own"}


def test_cpu_conv_script_times_every_3x3_conv_both_ways(monkeypatch, capsys):
    """benchmarks/cpu_convs.py --small: a row per 3x3 conv shape of the fast path's forward,
    Winograd within its float32 error bound wherever the shape is tiled, the rule's pick shown."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import cpu_convs

    rows = cpu_convs.main(["--small", "--repeats", "1", "--batch", "2"])
    shapes = {(r["shape"], r["out"]) for r in rows}
    assert ((2, 32, 16, 16), 32) in shapes and ((2, 64, 8, 8), 64) in shapes
    assert ((2, 32, 16, 16), 6) in shapes  # the output conv; the up blocks' folded convs are not 3x3
    assert all(r["direct_ms"] > 0 and r["winograd_ms"] > 0 and r["winograd_err"] <= 3e-5 for r in rows)
    assert not any(r["pick"] for r in rows)  # 32-64 channels: below the rule's width
    out = capsys.readouterr().out
    assert out.count("| [2, ") == len(rows) and "3x3 convs per forward: direct" in out


def test_reads_script_counts_what_the_statistics_kernel_spares(monkeypatch):
    """benchmarks/reads.py: the full-size 64x64 U-Net on the meta device; each setting reads
    strictly less than the one before (the fractions are what NOTES.md quotes), and everything
    it switches or stubs is back afterwards."""
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import reads

    from adm_cli import fused, layers

    def state():
        return (fused._launch, fused.gemm_runs, F.conv2d, F.conv_transpose2d, layers.SHARED_STATS,
                layers.SKIP_STATS, layers.IN_STATS, layers.RESIDUAL_STATS)

    before = state()
    row = reads.main(["--models", "64x64_diffusion"])["64x64_diffusion"]
    assert state() == before
    none, shared, skip, inp, residual = row.values()
    assert none > shared > skip > inp > residual > 0.3 * none
    # (the 64x64 U-Net's skips: 15.0% of the reads, skip_add's outputs 16.7% more, the input conv's
    # 2.2% more, the residual adds' 18.0% more)
    assert 0.10 < 1 - shared / none < 0.20 and 0.25 < 1 - skip / none < 0.40 and 0.4 < 1 - residual / none < 0.6


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_smoke_switches_back_a_broken_part(fault, monkeypatch):
    """benchmarks/smoke.py (a GPU session's first step): a part that raises or gives wrong numbers
    is switched back, the parts older than it are kept, and layers' switches are left as they were."""
    from test_fused import _kernel_device

    from adm_cli import fused, layers

    device = _kernel_device()
    if device is None:
        pytest.skip("no Triton kernels here (no GPU, no interpreter)")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import smoke

    monkeypatch.setattr(smoke, "FAMILIES", ("new-order",))  # (one U-Net keeps the interpreter's time down)
    monkeypatch.setattr(smoke, "CLASSIFIER", False)
    monkeypatch.setattr(smoke, "inputs", functools.partial(smoke.inputs, n=1))  # (one image: the same reason)
    dtype = "float16" if device == "cuda" else "float32"
    if fault == "raises":
        assert smoke.find_sets(device, dtype) == []
    real = fused.conv_in_direct

    def broken(*a, **k):
        if fault == "raises":
            raise RuntimeError("PTX rejected")
        return real(*a, **k) * 1.05

    monkeypatch.setattr(fused, "conv_in_direct", broken)
    before = {name: getattr(layers, name) for name in ("DIRECT_IN", "RESIDUAL_STATS", "SKIP_STATS")}
    assert smoke.find_sets(device, dtype) == ["DIRECT_IN=off"]
    assert {name: getattr(layers, name) for name in before} == before
