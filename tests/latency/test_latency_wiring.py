"""``--budget-metric latency`` in the pipeline: compress needs a table, build measures one only on ONNX engines,
and a given table steers the plan and is recorded in it."""

from __future__ import annotations

import pytest

from slimexport import api
from slimexport.errors import UsageError
from slimexport.latency import Group, LatencyTable, TableKey


def test_compress_without_a_table_says_to_use_build(tmp_path):
    with pytest.raises(UsageError, match="use slimexport build --budget-metric latency"):
        api.compress(model="tiny", budget_metric="latency", out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_build_refuses_latency_on_engines_it_cannot_probe(tmp_path):
    with pytest.raises(UsageError, match="not --backend torch"):
        api.build(model="tiny", budget_metric="latency", backend="torch", out=tmp_path / "b")


def _synthetic_table(unet) -> LatencyTable:
    """tiny's groups with engine times linear in the rank (1 ms per module at full rank; FFNs twice that)."""
    from slimexport.latency.measure import plan_groups

    plans = plan_groups(unet, ("attn", "ffn"), 16, 16)
    groups, members = {}, {}
    for gid, p in plans.items():
        per = 2.0 if p.kind.name == "ff" else 1.0
        groups[gid] = Group(kind=p.kind.name, max_rank=p.max_rank, signature=p.signature, widths=p.widths,
                            times_ms=tuple(per * w / p.max_rank for w in p.widths))
        members.update({m: gid for m in p.members})
    total = sum(len(p.members) * (2.0 if p.kind.name == "ff" else 1.0) for p in plans.values())
    key = TableKey(backend="onnxruntime", device="cpu", device_name="test", dtype="fp32", threads=1, batch=2, height=16,
                   width=16, versions={}, arch="tiny")
    return LatencyTable(key=key, dense_ms=2 * total, groups=groups, members=members)  # half the time untouched


def test_a_table_steers_the_plan_and_is_recorded(tiny, tmp_path):
    table = _synthetic_table(tiny.unet)
    res = api.compress(model="tiny", budget_metric="latency", budget=0.8, calib_prompts=4, calib_steps=2, calib_batch=4,
                       latency=table, out=tmp_path / "c", bundle=tiny, progress=False, cache_dir=tmp_path / "cache")
    pred = res.plan["allocation"]["latency"]
    assert pred["table"] == table.key.digest and pred["dense_ms"] == pytest.approx(table.dense_ms)
    # the targeted modules are half the time: a 0.8 budget cuts 20 % of the whole, 40 % of their time, within a step
    assert 0.78 <= pred["predicted_ms"] / pred["dense_ms"] <= 0.8 + 1e-9
    assert pred["predicted_speedup"] == pytest.approx(pred["dense_ms"] / pred["predicted_ms"], rel=1e-3)


def _digest(module) -> str:
    import hashlib

    h = hashlib.sha256()
    for _, v in sorted(module.state_dict().items()):
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_a_forced_copy_shares_no_storage_with_the_original():
    """converted_copy(force_copy=True) at the same device and dtype used to alias every tensor of the original."""
    import torch

    from slimexport.models.bundle import converted_copy

    layer = torch.nn.Linear(4, 3)
    before = _digest(layer)
    copy = converted_copy(layer, force_copy=True)
    with torch.no_grad():
        copy.weight.zero_()
        copy.bias.fill_(1.0)
    assert _digest(layer) == before


def test_measuring_a_table_leaves_the_model_untouched():
    """The probes re-initialise their copies in place: the build's dense UNet must not change (it is compressed,
    exported and compared afterwards)."""
    from slimexport.engines.base import EngineProfile
    from slimexport.latency import measure_table
    from slimexport.models import load_model

    unet = load_model("tiny").unet.eval()
    before = _digest(unet)
    measure_table(unet, ("attn",), EngineProfile(2, 2, 2, 16, 16, 16, 16, 16, 16), "onnxruntime", cache_dir=None,
                  progress=False, rounds=2, n_widths=2, dense_ms=1.0)
    assert _digest(unet) == before
