from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from slimexport.bench.timing import compare_speed, speedup_interval, time_callable
from slimexport.engines.base import Engine, make_feeds, unet_io_spec
from slimexport.errors import UsageError

SPEC = unet_io_spec(dtype="fp32", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32)


class SleepEngine(Engine):
    """An engine whose every call takes ``ms`` milliseconds."""

    def __init__(self, ms: float, name: str = "fake", device: str = "cpu"):
        self.ms, self.name, self.device, self.io_spec, self.calls = ms, name, device, SPEC, 0

    def _run(self, feeds):
        self.calls += 1
        time.sleep(self.ms / 1e3)
        return {"latent": feeds["sample"]}


class JitterEngine(SleepEngine):
    """``ms`` milliseconds plus a seeded random 0..``ms`` more: two of them never time alike."""

    def __init__(self, ms: float, seed: int):
        super().__init__(ms)
        self.rng = np.random.default_rng(seed)

    def _run(self, feeds):
        self.calls += 1
        time.sleep(self.ms * (1 + self.rng.random()) / 1e3)
        return {"latent": feeds["sample"]}


def test_time_callable_percentiles():
    res = time_callable(lambda: time.sleep(0.002), warmup=2, iterations=15)
    assert res["iterations"] == 15 and res["warmup"] == 2 and res["timer"] == "perf_counter"
    assert 2.0 <= res["min"] <= res["p50"] <= res["p90"] <= res["p99"]
    assert res["p50"] < 50.0 and res["mean"] >= 2.0


def test_time_callable_counts_calls_and_validates():
    n = []
    time_callable(lambda: n.append(1), warmup=3, iterations=7)
    assert len(n) == 10
    with pytest.raises(UsageError):
        time_callable(lambda: None, iterations=0)
    with pytest.raises(UsageError):
        time_callable(lambda: None, warmup=-1)


@pytest.mark.parametrize("interleave", [True, False])
def test_compare_speed_fake_engines(interleave):
    dense, slim = SleepEngine(6.0), SleepEngine(3.0)
    feeds = make_feeds(SPEC, 2, 8, 8)
    res = compare_speed(dense, slim, feeds, warmup=1, iterations=10, interleave=interleave, rounds=2)
    assert dense.calls == slim.calls == 11
    assert res["dense_ms"]["iterations"] == res["slim_ms"]["iterations"] == 10
    assert 1.4 < res["speedup"] < 2.8
    assert res["speedup"] == pytest.approx(res["dense_ms"]["p50"] / res["slim_ms"]["p50"])
    lo, hi = res["speedup_ci95"]
    assert lo <= res["speedup"] <= hi and lo > 1.0  # 6 ms against 3 ms: clearly faster
    assert res["shapes"]["sample"] == [2, 4, 8, 8] and res["backend"] == "fake"
    env = res["environment"]
    assert env["device_name"] and env["cpus_available"] >= 1 and env["versions"]["torch"] == torch.__version__


def test_compare_speed_by_budget_stops_on_a_tight_interval_or_the_clock():
    feeds = make_feeds(SPEC, 2, 8, 8)
    clear = compare_speed(SleepEngine(6.0), SleepEngine(2.0), feeds, warmup=1, iterations=10, target_ci=0.2, max_seconds=20)
    lo, hi = clear["speedup_ci95"]
    assert clear["stopped_by"] == "interval" and (hi - lo) / 2 <= 0.2 * clear["speedup"]
    assert clear["iterations"] == clear["dense_ms"]["iterations"] >= 10
    # two equal engines with random jitter never give a 0.1% interval: the time limit ends it, after the first block
    tied = compare_speed(JitterEngine(2.0, 0), JitterEngine(2.0, 1), feeds, warmup=0, iterations=10, target_ci=0.001, max_seconds=0.3)
    assert tied["stopped_by"] == "time" and tied["iterations"] > 10 and tied["timed_seconds"] >= 0.3
    capped = compare_speed(SleepEngine(1.0), SleepEngine(1.0), feeds, warmup=0, iterations=10, target_ci=0.0001,
                           max_seconds=60, max_iterations=25)
    assert capped["stopped_by"] == "max_iterations" and capped["iterations"] == 25
    exact = compare_speed(SleepEngine(1.0), SleepEngine(1.0), feeds, warmup=0, iterations=12)
    assert exact["stopped_by"] == "iterations" and exact["iterations"] == 12


def test_compare_speed_refuses_mixed_backends():
    feeds = make_feeds(SPEC, 2, 8, 8)
    with pytest.raises(UsageError, match="same backend and device"):
        compare_speed(SleepEngine(1, name="torch"), SleepEngine(1, name="onnxruntime"), feeds)
    with pytest.raises(UsageError, match="same backend and device"):
        compare_speed(SleepEngine(1), SleepEngine(1, device="cuda:0"), feeds)


def _slim_tiny_unet(rank_qk: int = 4, rank_vo: int = 4):
    """``tiny`` with every attention slimmed (per-head q/k size ``rank_qk``, v/o size ``rank_vo``; dense 16)."""
    from slimexport.models.arch import blocks
    from slimexport.models.load import build_unet
    from slimexport.models.registry import TINY_UNET
    from slimexport.slim.apply import install_processors, replace_linears

    unet = build_unet(TINY_UNET)
    g = torch.Generator().manual_seed(1)
    weights = {}
    for b in blocks(unet):
        for name, ctx in (("attn1", b.width), ("attn2", b.context_dim)):
            h = b.num_heads
            weights[f"{b.path}.{name}.to_q.weight"] = torch.randn(h * rank_qk, b.width, generator=g) * b.width ** -0.5
            weights[f"{b.path}.{name}.to_k.weight"] = torch.randn(h * rank_qk, ctx, generator=g) * ctx ** -0.5
            weights[f"{b.path}.{name}.to_v.weight"] = torch.randn(h * rank_vo, ctx, generator=g) * ctx ** -0.5
            weights[f"{b.path}.{name}.to_out.0.weight"] = torch.randn(b.width, h * rank_vo, generator=g) * (h * rank_vo) ** -0.5
    replace_linears(unet, weights)
    install_processors(unet)
    return unet.eval()


def test_compare_speed_torch_dense_vs_slim():
    from slimexport.engines.torch_runner import TorchEngine
    from slimexport.models.load import build_unet
    from slimexport.models.registry import TINY_UNET
    from slimexport.slim.attention import SlimAttnProcessor

    dense_unet, slim_unet = build_unet(TINY_UNET).eval(), _slim_tiny_unet()
    assert {type(p) for p in slim_unet.attn_processors.values()} == {SlimAttnProcessor}
    assert sum(p.numel() for p in slim_unet.parameters()) < sum(p.numel() for p in dense_unet.parameters())
    dense, slim = TorchEngine(dense_unet), TorchEngine(slim_unet)
    calls = {"dense": 0, "slim": 0}

    def counting(engine, key):
        prepare = engine.prepare

        def counted_prepare(feeds):
            fn = prepare(feeds)

            def call():
                calls[key] += 1
                return fn()
            return call
        engine.prepare = counted_prepare

    counting(dense, "dense")
    counting(slim, "slim")
    feeds = make_feeds(dense.io_spec, 2, 16, 16)
    # two different models: the comparison times the real slim UNet, not the dense one twice
    out_d, out_s = dense.run(feeds)["latent"], slim.run(feeds)["latent"]
    assert out_d.shape == out_s.shape == (2, 4, 16, 16) and np.isfinite(out_s).all()
    assert float(np.abs(out_d - out_s).max()) > 1e-3
    res = compare_speed(dense, slim, feeds, warmup=1, iterations=3)
    assert calls == {"dense": 4, "slim": 4}  # 1 warm-up + 3 timed calls each
    assert res["dense_ms"]["iterations"] == res["slim_ms"]["iterations"] == 3 and res["warmup"] == 1
    for k in ("dense_ms", "slim_ms"):
        t = res[k]
        assert 0 < t["min"] <= t["p50"] <= t["p90"] <= t["p99"] and t["min"] <= t["mean"]
    assert res["speedup"] == pytest.approx(res["dense_ms"]["p50"] / res["slim_ms"]["p50"]) and np.isfinite(res["speedup"])
    assert res["speedup_ci95"] is None  # 3 pairs: too few for an interval
    assert res["backend"] == "torch" and res["device"] == "cpu" and res["timer"] == "perf_counter"
    assert res["mode"] == "interleaved ABBA" and res["shapes"]["sample"] == [2, 4, 16, 16]
    for k in ("dense_engine", "slim_engine"):
        info = res[k]
        assert info["backend"] == "torch" and info["device"] == "cpu" and info["threads"] == torch.get_num_threads() >= 1
        assert info["dtype"] == "fp32" and info["versions"]["torch"] == torch.__version__
    assert res["environment"]["torch_threads"] == torch.get_num_threads()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events():
    x = torch.randn(2048, 2048, device="cuda")
    res = time_callable(lambda: x @ x, warmup=3, iterations=20, device="cuda")
    assert res["timer"] == "cuda_events" and 0 < res["p50"] <= res["p99"]
    big = time_callable(lambda: (x @ x) @ x, warmup=3, iterations=20, device="cuda")
    assert big["p50"] > res["p50"]  # two products take longer than one: events time the GPU work


def test_speedup_interval_is_the_bootstrap_of_the_ratio_of_medians():
    rng = np.random.default_rng(1)
    drift = rng.normal(0, 3.0, 400)  # shared by each iteration's two calls
    dense = 20.0 + drift + rng.normal(0, 0.2, 400)
    slim = 10.0 + drift + rng.normal(0, 0.2, 400)
    lo, hi = speedup_interval(dense, slim)
    assert lo < np.median(dense) / np.median(slim) < hi and 1.8 < lo and hi < 2.2
    # identical timings: no interval at all; equal engines: an interval around 1 that a "speed-up" must clear
    assert speedup_interval([5.0] * 10, [5.0] * 10) == (1.0, 1.0)
    same = 10.0 + rng.normal(0, 1.0, (2, 30))
    lo, hi = speedup_interval(same[0], same[1])
    assert lo < 1.0 < hi
    assert speedup_interval(dense, slim, seed=3) == speedup_interval(dense, slim, seed=3)
    with pytest.raises(ValueError, match="equally long"):
        speedup_interval([1.0, 2.0], [1.0])


def test_speedup_text_says_when_the_run_cannot_tell_the_models_apart():
    from slimexport.report import speedup_text

    assert speedup_text({"speedup": 1.2, "speedup_ci95": [1.1, 1.3]}) == "1.200× (95% interval 1.100–1.300)"
    assert "not distinguishable from 1" in speedup_text({"speedup": 1.02, "speedup_ci95": [0.95, 1.1]}, "x")
    assert speedup_text({"speedup": 1.02}) == "1.020×"  # a report written before the interval existed
    assert speedup_text({"speedup": 0.646, "speedup_ci95": None}) == "0.646× (no interval: fewer than 10 iterations)"
