"""tools/device_check.py degrades to a CPU smoke run on ``tiny``: every section runs and records its rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_device_check_cpu_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVCHECK_WORK": str(tmp_path / "work"), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "device_check.py"), "--groups", "main",
                        "--variants", "resnet_macs,proj", "--sections", "speed,kernels_e2e,hooks", "--core-batches", "2",
                        "--iterations", "2", "--deadline", "600", "--no-kernels", "--no-onnx"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert data["env"]["model"] == "tiny"
    sections = data["sections"]
    for name in ("compress", "resnet_macs", "proj", "speed", "kernels_e2e", "hooks"):
        assert "error" not in sections[name] and "skipped" not in sections[name], (name, sections[name])
    assert {r["model"] for r in sections["speed"]["rows"]} == {"attnffn", "resnet_macs", "proj"}
    ci = [r["speedup_ci95"] for r in sections["speed"]["rows"]]
    assert all(r["speedup"] > 0 for r in sections["speed"]["rows"])
    assert all(c is None for c in ci) if sections["speed"]["iterations"] < 10 else all(0 < c[0] <= c[1] for c in ci)
    assert len(sections["kernels_e2e"]["rows"]) == 4 and all(r["padded_sdpa_p50"] > 0 for r in sections["kernels_e2e"]["rows"])
    h = sections["hooks"]
    assert h["image_evals"] > 0 and h["overhead_ratio"] > 0 and h["finalize_seconds"] >= 0
    macs = sections["resnet_macs"]["macs"]
    assert macs["slim"] / macs["dense"] <= 0.73 + 0.05  # a MAC budget of 0.73, within rank steps


def test_device_check_defaults_cpu_smoke(tmp_path):
    """The default run (the scale issue's list: compress, speed, hooks, other shapes, kernel benchmarks, ONNX check)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVCHECK_WORK": str(tmp_path / "work"), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "device_check.py"), "--iterations", "2"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    sections = json.loads((tmp_path / "out" / "device_check.json").read_text())["sections"]
    assert list(sections) == ["compress", "speed", "hooks", "speed_extra", "kernels", "onnx"]
    for name, sec in sections.items():
        assert "error" not in sec and "skipped" not in sec, (name, sec)
    assert sections["kernels"]["returncode"] == 0
    assert sections["onnx"]["passed"] and sections["onnx"]["max_abs"] < 1e-4
    assert {(r["batch"], tuple(r["latent"])) for r in sections["speed_extra"]["rows"]} == {(1, (16, 16)), (2, (24, 24)), (2, (32, 32))}


def test_device_check_aoti_cpu_smoke(tmp_path):
    """The aoti group compiles dense and two slim packages, then times them in a fresh process even after
    --deadline has passed (the deadline keeps a compile from starting late, it must not throw the compile away)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVCHECK_WORK": str(tmp_path / "work"), "CUDA_VISIBLE_DEVICES": ""}
    deadline = 30
    p = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "device_check.py"), "--groups", "aoti",
                        "--deadline", str(deadline)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "device_check_aoti.json").read_text())
    sections = data["sections"]
    assert list(sections) == ["compress", "deep50", "aoti_build", "aoti_speed"]
    assert set(sections["aoti_build"]["packages"]) == {"dense", "attnffn", "deep50"}
    assert all("error" not in row for row in sections["aoti_build"]["packages"].values())
    speed = sections["aoti_speed"]
    assert speed["worker_exit"] == 0 and "skipped" not in speed, speed
    assert {(r["model"], r["batch"]) for r in speed["rows"]} == {(m, b) for m in ("attnffn", "deep50") for b in (2, 8)}
    assert all(r["dense_p50"] > 0 and r["slim_p50"] > 0 for r in speed["rows"])
    assert data["total_seconds"] > deadline  # the timing ran after the deadline (compiling takes longer than that)
