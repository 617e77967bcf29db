"""Measuring the latency table: groups and widths, the probes' slim forms, one real measurement on ``tiny`` with ONNX
Runtime, and the cache (a second call measures nothing; another key measures again)."""

import pytest
import torch

from slimexport.engines.base import EngineProfile
from slimexport.errors import UsageError
from slimexport.latency import measure
from slimexport.latency.table import Group
from slimexport.models.kinds import KINDS, UNITS

PROFILE = EngineProfile.static(2, 16, 16, latent_multiple=2)  # tiny: 32 px images, 16x16 latents, UNet batch 2


def test_widths_span_the_levels():
    levels = [8, *range(64, 1281, 64)]
    assert measure.spread_widths(levels, 5) == (8, 320, 640, 960, 1280)
    assert measure.spread_widths([8, 16, 24], 5) == (8, 16, 24)
    assert measure.spread_widths(levels, 2) == (8, 1280)


def test_unit_resolution():
    assert measure.unit_resolution(64, 32, 32) == (8, 8, 4)
    assert measure.unit_resolution(32, 8, 16) == (4, 8, 2)
    with pytest.raises(UsageError, match="downsampled"):
        measure.unit_resolution(30, 32, 32)


def test_groups_share_one_shape_and_resolution(tiny):
    plans = measure.plan_groups(tiny.unet, ("attn", "ffn", "resnet"), 16, 16)
    members = [m for p in plans.values() for m in p.members]
    assert len(members) == len(set(members))
    blocks = UNITS["block"].find(tiny.unet)
    assert {f"{b.path}.ff" for b in blocks} <= set(members)
    for p in plans.values():
        assert p.widths[-1] == p.max_rank and p.h * p.factor == 16
        assert all(m.endswith("." + p.kind.name) for m in p.members)


def test_probe_modules_are_the_slim_forms(tiny):
    blk = UNITS["block"].find(tiny.unet)[0]
    ff = measure.slim_module(tiny.unet, KINDS["ff"], blk, 8)
    assert ff.net[2].in_features == 8 and ff.net[0].proj.out_features == 16
    a1 = measure.slim_module(tiny.unet, KINDS["attn1.vo"], blk, 4)
    assert a1.to_v.out_features == 4 * a1.heads and a1.to_q.out_features == blk.width  # QK untouched
    assert type(a1.processor).__name__ == "SlimAttnProcessor"
    res = UNITS["resnet"].find(tiny.unet)
    r = next(i for i in res if i.in_channels != i.out_channels)
    block = measure.slim_module(tiny.unet, KINDS["resnet"], r, 2)
    assert block.conv1.out_channels == 2 * r.group_size
    chain = measure.ProbeChain([block, measure.slim_module(tiny.unet, KINDS["resnet"], r, 2, seed=1)], "resnet", False, chain=False)
    out = chain(torch.randn(2, r.in_channels, 8, 8), torch.randn(2, r.temb_dim))
    assert out.shape == (2, r.out_channels, 8, 8) and torch.isfinite(out).all()
    assert tiny.unet.get_submodule(r.path).conv1.out_channels == r.inner  # the model is untouched


def test_architecture_digest_ignores_diffusers_bookkeeping(tiny):
    class Stub:
        def __init__(self, order):
            self.config = {**dict(tiny.unet.config), "_use_default_values": order, "_name_or_path": str(order)}

        def named_parameters(self):
            return tiny.unet.named_parameters()

    assert measure.architecture_digest(Stub(["a", "b"])) == measure.architecture_digest(Stub(["b", "a"]))
    assert measure.architecture_digest(Stub([])) == measure.architecture_digest(tiny.unet)
    blk = UNITS["block"].find(tiny.unet)[0]
    slim = measure.slim_module(tiny.unet, KINDS["ff"], blk, 8)

    class Narrow(Stub):
        def named_parameters(self):
            return [("x.weight", slim.net[2].weight)]

    assert measure.architecture_digest(Narrow([])) != measure.architecture_digest(Stub([]))


def test_per_module_times_subtract_the_fixed_call_time():
    # 3 copies; module time 2 ms at width 8, 5 ms at the dense width; 1 ms fixed per call
    chain = [[1 + 3 * 2.0] * 4, [1 + 3 * 5.0] * 4]
    med, iqr = measure.per_module_times(chain, [1 + 5.0] * 4, copies=3)
    assert med == pytest.approx([2.0, 5.0]) and iqr == pytest.approx([0.0, 0.0])


def test_a_backend_without_probes_is_refused(tiny):
    with pytest.raises(UsageError, match="ONNX engines"):
        measure.measure_table(tiny.unet, ("ffn",), PROFILE, "torch", dense_ms=1.0)


def test_measure_on_onnxruntime_then_reuse_the_cache(tiny, tmp_path, monkeypatch):
    kw = dict(cache_dir=tmp_path / "cache", dense_ms=10.0, copies=2, n_widths=2, rounds=2, warmup=0, threads=1,
              progress=False, work_dir=tmp_path / "work", calibrate=False)
    table = measure.measure_table(tiny.unet, ("ffn",), PROFILE, "onnxruntime", **kw)
    blocks = UNITS["block"].find(tiny.unet)
    assert table.covers(f"{b.path}.ff" for b in blocks) and not table.covers([f"{blocks[0].path}.attn1.qk"])
    for g in table.groups.values():
        assert len(g.widths) == 2 and all(t == t and abs(t) < 1e4 for t in g.times_ms)  # measured, finite
    assert table.key.backend == "onnxruntime" and table.key.threads == 1 and table.dense_ms == 10.0
    assert len(list((tmp_path / "cache").glob("latency-*.json"))) == 1
    assert not any((tmp_path / "work").iterdir())  # probe exports removed

    calls = []

    def fake(unet, plan, *a, **k):
        calls.append(plan.gid)
        return Group(kind=plan.kind.name, max_rank=plan.max_rank, signature=plan.signature, widths=plan.widths,
                     times_ms=tuple(float(w) for w in plan.widths))

    monkeypatch.setattr(measure, "measure_group", fake)
    again = measure.measure_table(tiny.unet, ("ffn",), PROFILE, "onnxruntime", **kw)
    assert calls == [] and again.groups == table.groups  # loaded, nothing measured
    more = measure.measure_table(tiny.unet, ("attn", "ffn"), PROFILE, "onnxruntime", **kw)
    assert calls and all(g.startswith("attn") for g in calls) and more.covers([f"{blocks[0].path}.attn1.qk"])
    calls.clear()
    other = measure.measure_table(tiny.unet, ("ffn",), PROFILE, "onnxruntime", **{**kw, "threads": 2})
    assert len(calls) == len(other.groups) and other.key.digest != table.key.digest  # another key: measured again


def test_calibration_variants_and_scales(tiny):
    from slimexport.latency.table import LatencyTable, TableKey

    blocks = UNITS["block"].find(tiny.unet)
    g = Group(kind="ff", max_rank=128, signature={}, widths=(8, 36, 68, 128), times_ms=(1.0, 2.0, 3.0, 5.0))
    key = TableKey(backend="onnxruntime", device="cpu", device_name="x", dtype="fp32", threads=1, batch=2, height=16,
                   width=16, versions={}, arch="a")
    table = LatencyTable(key=key, dense_ms=100.0, groups={"g": g}, members={f"{blocks[0].path}.ff": "g"})
    ranks = measure.calibration_ranks(table, table.members)
    assert ranks == {f"{blocks[0].path}.ff": 68}  # the measured width nearest half of 128
    assert measure.fit_scale(10.0, 6.0, 100.0) == pytest.approx(0.6)
    assert measure.fit_scale(10.0, -3.0, 100.0) == measure.SCALE_RANGE[0]  # noise: clipped, not negative
    assert measure.fit_scale(1.0, 0.5, 100.0) is None  # 1% of the dense time: too little to learn from
    v = measure.variant_unet(tiny.unet, {**ranks, f"{blocks[0].path}.attn1.qk": 8})
    assert v.get_submodule(f"{blocks[0].path}.ff.net.2").in_features == 68
    assert v.get_submodule(f"{blocks[0].path}.attn1.to_q").out_features == 8 * blocks[0].num_heads
    assert tiny.unet.get_submodule(f"{blocks[0].path}.ff.net.2").in_features == 128  # the model is untouched
    x = torch.randn(2, 4, 16, 16)
    out = v(x, torch.tensor([10.0, 10.0]), encoder_hidden_states=torch.randn(2, 77, blocks[0].context_dim)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    scaled = LatencyTable(key=key, dense_ms=100.0, groups={"g": g}, members=table.members, scales={"ff": 0.5})
    assert scaled.saved_ms(ranks) == pytest.approx(0.5 * table.saved_ms(ranks))
    assert scaled.level_costs(f"{blocks[0].path}.ff", [128]) == pytest.approx([0.5 * table.level_costs(f"{blocks[0].path}.ff", [128])[0]])


def test_calibrated_measurement_on_onnxruntime(tiny, tmp_path):
    table = measure.measure_table(tiny.unet, ("ffn",), PROFILE, "onnxruntime", cache_dir=tmp_path / "cache", copies=2,
                                  n_widths=2, rounds=2, warmup=0, threads=1, progress=False, work_dir=tmp_path / "work",
                                  calibration_iterations=2)
    cal = table.meta["calibration"]["ffn"]
    assert cal["predicted_ms"] == cal["predicted_ms"]  # recorded
    if "skipped" not in cal:
        assert cal["dense_ms"] > 0 and table.scales["ff"] == cal["scale"]
        assert measure.SCALE_RANGE[0] <= table.scales["ff"] <= measure.SCALE_RANGE[1]
    assert table.meta["dense_source"] == "measured" and table.dense_ms > 0
    again = measure.measure_table(tiny.unet, ("ffn",), PROFILE, "onnxruntime", cache_dir=tmp_path / "cache", threads=1,
                                  progress=False)
    assert again.scales == table.scales and again.meta["calibration"] == table.meta["calibration"]  # not measured again
