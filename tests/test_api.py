"""End-to-end compressor on ``tiny``: exactness at budget 1, parameter counts, caching, bad input."""

import json

import pytest
import torch

from slimexport.allocate.api import plan_ranks
from slimexport.api import compress
from slimexport.config import AllocConfig, CalibConfig, CompressConfig, DecomposeConfig
from slimexport.decompose.api import slim_unet
from slimexport.errors import ModelNotFoundError, NumericalError, UsageError

CALIB = CalibConfig(num_prompts=4, num_steps=4, num_bins=2, batch_size=2)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_budget_one_reproduces_dense(tiny, tiny_stats, tiny_inputs):
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=1.0))
    slim, _ = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    x, ctx, ts = tiny_inputs
    for t in ts:
        tt = torch.full((4,), t)
        assert _rel(slim(x, tt, ctx).sample, tiny.unet(x, tt, ctx).sample) < 1e-5


def test_param_count_matches_plan_and_budget_changes_output(tiny, tiny_stats, tiny_inputs):
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.73))
    slim, diag = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    assert sum(p.numel() for p in slim.parameters()) == plan["params"]["slim_total"]
    assert plan["params"]["slim_total"] < plan["params"]["dense_total"]
    x, ctx, ts = tiny_inputs
    err = _rel(slim(x, torch.full((4,), 500.0), ctx).sample, tiny.unet(x, torch.full((4,), 500.0), ctx).sample)
    assert 0 < err < 1.0
    assert all(0.0 <= e <= 1.0 for e in diag["rel_error"].values())


def test_compress_writes_folder_and_reuses_cache(tmp_path):
    cfg = CompressConfig(model="tiny", calib=CALIB, alloc=AllocConfig(budget=0.73))
    r1 = compress(cfg, out=tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    assert (r1.slim_dir / "slim_plan.json").exists() and (tmp_path / "a" / "manifest.json").exists()
    r2 = compress(cfg, out=tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    assert all(r2.stages[s].cached for s in ("calibrate", "allocate", "decompose"))
    r3 = compress(cfg.replace(alloc=AllocConfig(budget=0.5)), out=tmp_path / "b", cache_dir=tmp_path / "cache", progress=False)
    assert r3.stages["calibrate"].cached and not r3.stages["decompose"].cached
    assert r3.plan["params"]["slim_total"] < r1.plan["params"]["slim_total"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert all(not p.startswith(("/", "..")) for s in manifest["stages"].values() for p in s["files"])


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, float("nan")])
def test_bad_budget(budget):
    with pytest.raises(UsageError, match="budget"):
        AllocConfig(budget=budget)


def test_unknown_model_fails_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="random-weights"):
        compress(CompressConfig(model="sd14", calib=CALIB), out=tmp_path / "x", progress=False)
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "x").exists()


def test_empty_prompts_file_is_refused_and_nothing_written(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n# only a comment\n")
    cfg = CompressConfig(model="tiny", calib=CALIB.replace(prompts_file=str(p)))
    with pytest.raises(UsageError, match="no prompts"):
        compress(cfg, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "slim_unet").exists()


def test_nan_statistics_abort_before_anything_is_written(tiny, tmp_path, monkeypatch):
    from slimexport.calibrate import collector as col_mod

    real = col_mod.kernel_accumulate

    def poisoned(acc, x):
        real(acc, x)
        if acc.shape[0] == 128:  # the GEGLU output of the first block
            acc[0, 0] = float("inf")

    monkeypatch.setattr("slimexport.calibrate.api.kernel_accumulate", poisoned)
    cfg = CompressConfig(model="tiny", calib=CALIB)
    with pytest.raises(NumericalError, match="GEGLU output.*timestep bin 0"):
        compress(cfg, out=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "out" / "slim_unet").exists() and not (tmp_path / "out" / "calib").exists()


def test_a_failed_slim_engine_closes_the_dense_one(monkeypatch):
    from types import SimpleNamespace

    from slimexport.config import BuildConfig
    from slimexport.engines import base, select
    from slimexport.engines.base import unet_io_spec

    closed = []

    class Fake:
        def close(self):
            closed.append(self)

    def build_engine(backend, source, cfg):
        if source == "slim":
            raise RuntimeError("out of memory")
        return Fake()

    monkeypatch.setattr(base, "build_engine", build_engine)
    spec = unet_io_spec(dtype="fp32", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32)
    exports = {k: SimpleNamespace(folder=k, io_spec=spec) for k in ("dense", "slim")}
    with pytest.raises(RuntimeError, match="out of memory"):
        select.make_engines(BuildConfig(), exports, {}, "cpu", None)
    assert len(closed) == 1


def test_compress_gives_the_bundle_unet_back_as_it_was(tmp_path):
    from slimexport.config import CalibConfig
    from slimexport.models import load_model
    from slimexport.models.bundle import move

    bundle = load_model("tiny")
    move(bundle.unet, "cpu", torch.float16)  # a caller's half-precision UNet
    cfg = CompressConfig(model="tiny", device="cpu", calib=CalibConfig(num_prompts=2, num_steps=2, num_bins=2, batch_size=2))
    compress(cfg, out=tmp_path / "o", bundle=bundle, progress=False, cache_dir=tmp_path / "cache")
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float16}


def test_a_long_stage_says_it_is_alive(caplog, monkeypatch):
    import logging
    import time

    from slimexport import stages

    monkeypatch.setattr(stages, "HEARTBEAT_S", 0.05)
    records = {}
    with caplog.at_level(logging.INFO, logger="slimexport"), stages.timed(records, "export_dense", False):
        time.sleep(0.3)
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert beats and beats[0].startswith("[export_dense] still running") and records["export_dense"].seconds >= 0.3
