"""benchmarks/bench.py runs end to end in its small CPU mode (what CI can afford)."""

import json
import os
import subprocess
import sys

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
