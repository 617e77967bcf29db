"""tools/latency_check.py's pure parts: variant names, and ``--repredict`` (an earlier check's measured rows predicted
again from saved tables, with nothing timed)."""

from __future__ import annotations

import json

import pytest

from slimexport.errors import UsageError
from slimexport.harness.latency_check import main, parse_variant
from slimexport.latency.table import Group, LatencyTable, TableKey


def test_variant_names():
    assert parse_variant("l70-greedy", ("attn", "ffn")) == {"name": "l70-greedy", "targets": ("attn", "ffn"), "budget": 0.7,
                                                            "method": "greedy", "metric": "latency"}
    with pytest.raises(UsageError, match="e.g. p73-softmax"):
        parse_variant("p73", ("attn",))


def test_repredict_uses_the_saved_table_and_keeps_the_measurements(tmp_path):
    key = TableKey(backend="onnxruntime", device="cpu", device_name="x", dtype="fp32", threads=2, batch=2, height=32,
                   width=32, versions={}, arch="a")
    ff = Group(kind="ff", max_rank=40, signature={}, widths=(8, 16, 40), times_ms=(3.0, 4.0, 10.0))
    table = LatencyTable(key=key, dense_ms=100.0, groups={"g": ff}, members={"a.ff": "g", "b.ff": "g"}, scales={"ff": 0.5})
    work = tmp_path / "work"
    table.save(work / "table-onnxruntime.json")
    row = {"variant": "p50-softmax", "backend": "onnxruntime", "targets": ["ffn"], "budget": 0.5, "metric": "params",
           "allocation": "softmax", "params_kept": 0.8, "ranks": {"a.ff": 16, "b.ff": 40}, "measured_dense_ms": 102.0,
           "measured_slim_ms": 96.0, "measured_speedup": 1.0625, "speedup_ci95": [1.05, 1.07], "iterations": 10,
           "measured_dense_min_ms": 101.0, "measured_slim_min_ms": 95.0, "predicted_ms": 1.0}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "slimexport.latency-check/1", "rows": [row], "summary": {}}))
    out = tmp_path / "new.json"
    assert main(["--repredict", str(old), "--work", str(work), "--out", str(out)]) == 0
    new = json.loads(out.read_text())
    r = new["rows"][0]
    assert r["predicted_ms"] == pytest.approx(100.0 - 0.5 * 6.0)  # a.ff 40 -> 16 saves 6 ms, scaled by 0.5
    assert r["predicted_speedup"] == pytest.approx(100.0 / 97.0)
    assert r["error_ms_pct"] == pytest.approx(100 * (97.0 - 96.0) / 96.0)
    assert r["measured_speedup"] == 1.0625 and r["params_kept"] == 0.8 and r["ranks"] == row["ranks"]
    assert new["repredicted_from"] == str(old) and new["summary"]["within_goal_ms"] == 1
    assert out.with_suffix(".md").read_text().count("onnxruntime") == 1
