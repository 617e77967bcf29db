"""tools/device_check.py degrades to a CPU smoke run on ``tiny``: one run of the sections most code goes through
(compress, the kernel switches of kernels_e2e, the hooks' sampler, the ONNX worker process, the kernel benchmark
process), each recording its rows."""

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
    p = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "device_check.py"), "--sections",
                        "kernels_e2e,hooks", "--core-batches", "2", "--iterations", "2", "--deadline", "900"],
                       env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert data["env"]["model"] == "tiny"
    sections = data["sections"]
    assert list(sections) == ["compress", "kernels_e2e", "hooks", "kernels", "onnx"]
    for name, sec in sections.items():
        assert "error" not in sec and "skipped" not in sec, (name, sec)
    rows = sections["kernels_e2e"]["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("attnffn", 2)]
    assert rows[0]["torch_p50"] > 0 and rows[0]["kernels_p50"] > 0 and rows[0]["padded_sdpa_p50"] > 0
    h = sections["hooks"]
    assert h["image_evals"] > 0 and h["overhead_ratio"] > 0 and h["finalize_seconds"] >= 0
    assert sections["kernels"]["returncode"] == 0
    assert json.loads((tmp_path / "out" / "kernels.json").read_text())["rows"]
    assert sections["onnx"]["passed"] and sections["onnx"]["max_abs"] < 1e-4
