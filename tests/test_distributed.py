"""Distributed calibration: 2 gloo processes on the CPU give the single-process statistics and rank plan."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

ARGS = ["-q", "compress", "--model", "tiny", "--calib-prompts", "6", "--calib-steps", "4", "--calib-bins", "2", "--calib-batch", "2"]


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    from slimexport.calibrate import CalibStats

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # separate working folders: no shared calibration cache between the two runs
    single = subprocess.run([sys.executable, "-m", "slimexport", *ARGS, "--out", str(tmp_path / "one")],
                            cwd=tmp_path / "a", capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = shutil.which("torchrun") or sys.executable
    cmd = ([torchrun] if torchrun.endswith("torchrun") else [sys.executable, "-m", "torch.distributed.run"])
    multi = subprocess.run([*cmd, "--nproc-per-node", "2", "-m", "slimexport", *ARGS, "--out", str(tmp_path / "two")],
                           cwd=tmp_path / "b", capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-2000:]
    a, b = CalibStats.load(tmp_path / "one" / "calib"), CalibStats.load(tmp_path / "two" / "calib")
    assert b.meta["world_size"] == 2
    for k, v in a.corr.items():
        assert torch.allclose(v, b.corr[k], rtol=1e-5, atol=1e-5 * float(v.abs().max())), k
    plan_a = json.loads((tmp_path / "one" / "plan.json").read_text())
    plan_b = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert plan_a["ranks"] == plan_b["ranks"]


@pytest.mark.slow
def test_a_failure_on_rank_0_ends_the_run_instead_of_hanging(tmp_path):
    """Rank 0 alone reads the output folder: when it refuses it, the other rank is waiting in a collective.
    Rank 0 must exit (torchrun then stops the rest), not wait in a shutdown barrier its peer never reaches."""
    out = tmp_path / "two"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "someone-else/1", "stages": {}}))
    torchrun = shutil.which("torchrun") or sys.executable
    cmd = ([torchrun] if torchrun.endswith("torchrun") else [sys.executable, "-m", "torch.distributed.run"])
    multi = subprocess.run([*cmd, "--nproc-per-node", "2", "-m", "slimexport", *ARGS, "--out", str(out)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert multi.returncode != 0
    assert "has format 'someone-else/1'" in multi.stderr + multi.stdout
