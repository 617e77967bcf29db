"""The latency table's arithmetic (interpolation, rank-0 base, level costs, prediction) and its JSON round trip."""

import json

import pytest

from slimexport.errors import IncompatibleArtifactError, UsageError
from slimexport.latency.table import Group, LatencyTable, TableKey, monotone_fit, table_path


def _key(**kw) -> TableKey:
    base = dict(backend="onnxruntime", device="cpu", device_name="test cpu", dtype="fp32", threads=2, batch=2, height=32,
                width=32, versions={"torch": "2.13.0", "onnxruntime": "1.32.0"}, arch="abc")
    return TableKey(**{**base, **kw})


def _table(dense_ms: float = 100.0) -> LatencyTable:
    ff = Group(kind="ff", max_rank=40, signature={"width": 8}, widths=(8, 16, 40), times_ms=(3.0, 4.0, 10.0))
    at = Group(kind="attn1.qk", max_rank=16, signature={"width": 8}, widths=(4, 16), times_ms=(5.0, 8.0))
    return LatencyTable(key=_key(), dense_ms=dense_ms, groups={"g_ff": ff, "g_at": at},
                        members={"a.ff": "g_ff", "b.ff": "g_ff", "a.attn1.qk": "g_at"})


def test_time_is_linear_between_measured_widths_and_continues_the_end_segments():
    g = _table().groups["g_ff"]
    assert g.time_at(8) == 3.0 and g.time_at(40) == 10.0
    assert g.time_at(12) == pytest.approx(3.5)
    assert g.time_at(28) == pytest.approx(4.0 + 6.0 * 12 / 24)
    assert g.time_at(4) == pytest.approx(2.5)  # below the lowest width: the first segment's slope
    assert g.base_ms == pytest.approx(2.0)  # rank 0 on that line


def test_base_is_clipped_between_zero_and_the_lowest_time():
    steep = Group(kind="ff", max_rank=16, signature={}, widths=(8, 16), times_ms=(1.0, 10.0))  # line hits 0 above rank 0
    assert steep.base_ms == 0.0
    falling = Group(kind="ff", max_rank=16, signature={}, widths=(8, 16), times_ms=(5.0, 4.0))  # noise: slower when narrower
    assert falling.base_ms == 4.5  # read flat (the monotone fit), so the whole time is the base


def test_times_are_read_through_their_non_decreasing_fit():
    assert monotone_fit([1.0, 3.0, 2.0, 4.0]) == (1.0, 2.5, 2.5, 4.0)
    assert monotone_fit([5.0, 1.0, 1.0, 2.0]) == (2.25,) * 4
    assert monotone_fit([1.0, 2.0]) == (1.0, 2.0)
    g = Group(kind="ff", max_rank=32, signature={}, widths=(8, 16, 24, 32), times_ms=(1.0, 3.0, 2.0, 4.0))
    assert g.times_ms == (1.0, 3.0, 2.0, 4.0)  # kept as measured
    assert g.time_at(16) == g.time_at(24) == 2.5 and g.time_at(28) == pytest.approx(3.25)


def test_level_costs_are_the_rank_dependent_time():
    t = _table()
    assert t.level_costs("a.ff", [8, 16, 40]) == pytest.approx([1.0, 2.0, 8.0])
    assert t.level_costs("a.attn1.qk", [4, 10, 16]) == pytest.approx([1.0, 2.5, 4.0])  # base 4 ms: 5 - 4·(3/12)


def test_predict_subtracts_each_modules_saving_from_the_dense_latency():
    t = _table(dense_ms=100.0)
    assert t.predict_ms({}) == 100.0
    assert t.predict_ms({"a.ff": 40, "a.attn1.qk": 16}) == pytest.approx(100.0)  # dense ranks save nothing
    # a.ff 40 -> 16 saves 6 ms, b.ff 40 -> 12 saves 6.5 ms, a.attn1.qk 16 -> 4 saves 3 ms
    assert t.predict_ms({"a.ff": 16, "b.ff": 12, "a.attn1.qk": 4}) == pytest.approx(100.0 - 6.0 - 6.5 - 3.0)
    p = t.prediction({"a.ff": 16})
    assert p["predicted_ms"] == pytest.approx(94.0) and p["predicted_speedup"] == pytest.approx(100 / 94, rel=1e-4)
    assert p["table"] == t.key.digest


def test_a_module_the_table_lacks_is_refused_with_the_fix():
    with pytest.raises(UsageError, match="no entry for c.ff.*targets"):
        _table().predict_ms({"c.ff": 8})
    assert not _table().covers(["a.ff", "c.ff"]) and _table().covers(["a.ff", "b.ff"])


def test_groups_are_validated():
    with pytest.raises(UsageError, match="widths"):
        Group(kind="ff", max_rank=16, signature={}, widths=(16, 8), times_ms=(1.0, 2.0))
    with pytest.raises(UsageError, match="dense rank"):
        Group(kind="ff", max_rank=32, signature={}, widths=(8, 16), times_ms=(1.0, 2.0))
    with pytest.raises(UsageError, match="missing groups"):
        LatencyTable(key=_key(), dense_ms=1.0, groups={}, members={"a.ff": "nowhere"})


def test_key_digest_changes_with_any_field():
    base = _key().digest
    assert _key().digest == base
    for change in ({"backend": "openvino"}, {"threads": 1}, {"height": 64}, {"dtype": "bf16"}, {"arch": "other"},
                   {"versions": {"torch": "2.14.0", "onnxruntime": "1.32.0"}}, {"device_name": "other cpu"}):
        assert _key(**change).digest != base, change


def test_save_and_load_round_trip(tmp_path):
    t = _table()
    path = table_path(tmp_path, t.key)
    assert path.name == f"latency-{t.key.digest}.json"
    t.save(path)
    back = LatencyTable.load(path)
    assert back == t
    assert back.predict_ms({"a.ff": 8}) == t.predict_ms({"a.ff": 8})
    d = json.loads(path.read_text())
    d["format"] = "slimexport.latency/0"
    path.write_text(json.dumps(d))
    with pytest.raises(IncompatibleArtifactError, match="format"):
        LatencyTable.load(path)


def test_merged_and_with_dense_ms():
    t = _table()
    extra = LatencyTable(key=t.key, dense_ms=50.0, groups={"g2": Group(kind="ff", max_rank=8, signature={}, widths=(8,), times_ms=(1.0,))},
                         members={"c.ff": "g2"})
    m = t.merged(extra)
    assert m.covers(["a.ff", "c.ff"]) and m.dense_ms == t.dense_ms
    assert m.group_of("c.ff").time_at(4) == pytest.approx(0.5)  # one width: proportional to the rank
    assert t.with_dense_ms(80.0).predict_ms({"a.ff": 16}) == pytest.approx(74.0)
    with pytest.raises(UsageError, match="different keys"):
        t.merged(LatencyTable(key=_key(threads=1), dense_ms=1.0, groups={}, members={}))
