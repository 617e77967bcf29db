"""``tools/trt_smoke.py`` on a machine without TensorRT (issue 21): it runs what it can, says what it could not
check, and exits 0; a check that fails stops the run with exit 1."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimexport.harness import trt_smoke

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the smoke runs its TensorRT checks instead")
def test_smoke_without_tensorrt_checks_what_it_can(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "trt_smoke.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads((tmp_path / "trt_smoke.json").read_text())["results"]
    status = {r["check"]: r["status"] for r in rec}
    assert list(status) == list(trt_smoke.Smoke.CHECKS)
    assert all(status[c] == "PASS" for c in ("versions", "export", "onnxruntime", "profile")), rec
    assert all(status[c] == "SKIP" for c in trt_smoke.Smoke.CHECKS[5:]), rec
    assert "not checked here: parse, build" in res.stdout
    assert "PASS onnxruntime:" in res.stdout and "FAIL" not in res.stdout


def test_a_failed_check_stops_the_run_with_exit_1(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("the exporter broke")

    monkeypatch.setattr(trt_smoke.Smoke, "export", broken)
    monkeypatch.setattr(trt_smoke.Smoke, "CHECKS", ("versions", "export", "onnxruntime"))
    assert trt_smoke.main(["--out", str(tmp_path)]) == 1
    rec = json.loads((tmp_path / "trt_smoke.json").read_text())["results"]
    assert [(r["check"], r["status"]) for r in rec] == [("versions", "PASS"), ("export", "FAIL")]
    assert "the exporter broke" in rec[-1]["detail"] and "traceback" in rec[-1]
