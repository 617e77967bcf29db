"""``slimexport build`` killed with SIGKILL inside each stage, then rerun: every rerun resumes from the last
completed stage (the stages before the kill are cache hits), a killed run leaves nothing the next one trusts (the
manifest records only finished stages, each file with its digest), and the run that finally completes writes the
same ``report.json`` as an uninterrupted build, timings aside.

One chain of processes keeps this affordable: run 1 is killed in ``calibrate``, its rerun in ``decompose``, the
next in ``export_dense``, and so on; the last run completes. Each process runs in its own working directory
(``engines/.cache`` is per test) with one OpenMP thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _rel_helpers import SMALL, strip_timings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARGS = ["build", "--model", "tiny", *SMALL, "--iterations", "10", "--warmup", "0"]
STAGE_TIMEOUT_S = 240  # one process, start to finish, on a loaded 2-core machine takes well under a minute
POLL_S = 0.02
# log stage name -> manifest stage name
MANIFEST_STAGE = {"calibrate": "calibrate", "allocate": "plan", "decompose": "slim", "export_dense": "export_dense",
                  "export_slim": "export_slim", "verify": "verify", "bench": "bench"}
ORDER = ["calibrate", "allocate", "decompose", "export_dense", "export_slim", "engine", "verify", "bench"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _start(cwd: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "slimexport", *ARGS, "--out", str(out)], cwd=cwd, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(proc: subprocess.Popen, log: Path, predicate, what: str) -> None:
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if predicate(text):
            return
        if proc.poll() is not None:
            pytest.fail(f"the build exited ({proc.returncode}) before {what}:\n{text[-3000:]}")
        time.sleep(POLL_S)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-3000:]}")


def run_to_end(cwd: Path, out: Path, log: Path) -> str:
    proc = _start(cwd, out, log)
    try:
        rc = proc.wait(timeout=STAGE_TIMEOUT_S * 2)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    return text


def run_and_kill(cwd: Path, out: Path, log: Path, stage: str, delay_s: float, files=None) -> str:
    """Start a build, SIGKILL it once ``[<stage>] running`` is logged (and ``files(out)`` is true), after ``delay_s``."""
    proc = _start(cwd, out, log)
    try:
        _wait_for(proc, log, lambda t: f"[{stage}] running" in t, f"stage {stage}")
        if files is not None:
            _wait_for(proc, log, lambda t: files(out), f"files of stage {stage}")
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert rc == -signal.SIGKILL, f"the build was not killed inside {stage} (exit {rc}):\n{text[-3000:]}"
    assert f"[{stage}] done" not in text
    return text


def _partial_export(kind: str):
    def there(out: Path) -> bool:  # the exporter's temporary folder exists and holds the traced graph
        return any(p.name.startswith(f".tmp-{kind}.") and any(p.rglob("*")) for p in (out / "onnx").glob(".tmp-*"))

    return there


def check_nothing_untrusted(out: Path, killed: str) -> None:
    """What a killed run left: a readable manifest recording only finished stages, each file matching its digest."""
    from slimexport.cache import Manifest

    if not (out / "manifest.json").exists():
        return
    data = json.loads((out / "manifest.json").read_text())  # never half-written
    manifest = Manifest(out)
    assert MANIFEST_STAGE.get(killed) not in data["stages"], f"{killed} recorded although it was killed"
    for stage in data["stages"]:
        assert manifest.altered(stage) == [], stage
    assert not (out / "report.json").exists()


def finished_before(stage: str) -> list[str]:
    """Stages a run killed in ``stage`` had finished (``engine`` aside: it is rebuilt from the exports each run).
    ``decompose`` rewrites ``plan.json`` (adding errors and MACs) before recording it, so a kill there may
    leave the plan stage to redo."""
    skip = {"engine", "allocate"} if stage == "decompose" else {"engine"}
    return [s for s in ORDER[:ORDER.index(stage)] if s not in skip]


# Kill points: (stage, seconds after "[stage] running", extra condition on the output folder).
KILLS = [
    ("calibrate", 0.3, None),
    ("decompose", 0.0, None),
    ("export_dense", 0.5, None),
    ("export_slim", 0.0, _partial_export("slim")),  # mid-write: the temporary export folder is on disk
    ("verify", 0.3, None),
    ("bench", 0.0, None),
]


def test_killed_builds_resume_and_match_a_clean_build(tmp_path):
    clean_cwd, cwd = tmp_path / "clean", tmp_path / "killed"
    clean_cwd.mkdir()
    cwd.mkdir()
    clean_out, out = clean_cwd / "build", cwd / "build"
    run_to_end(clean_cwd, clean_out, tmp_path / "clean.log")
    clean = json.loads((clean_out / "report.json").read_text())

    done: list[str] = []
    for i, (stage, delay, files) in enumerate(KILLS):
        text = run_and_kill(cwd, out, tmp_path / f"run{i}.log", stage, delay, files)
        for earlier in done:  # resumed: every stage finished by an earlier run is a cache hit
            assert f"[{earlier}] cached" in text, (earlier, text[-3000:])
        check_nothing_untrusted(out, stage)
        done = finished_before(stage)

    text = run_to_end(cwd, out, tmp_path / "final.log")
    for earlier in done:
        assert f"[{earlier}] cached" in text, (earlier, text[-3000:])
    assert "[bench] running" in text
    resumed = json.loads((out / "report.json").read_text())
    assert strip_timings(resumed) == strip_timings(clean)
    assert resumed["passed"]
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".tmp-*")]
    assert not leftovers, f"temporary files of the killed runs are still there: {leftovers}"
