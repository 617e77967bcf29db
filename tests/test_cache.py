"""The stage cache: keys are content hashes, a record is trusted only while its files are intact."""

from slimexport.cache import Manifest, stage_key


def test_stage_key_is_a_content_hash():
    assert stage_key("plan", {"a": 1, "b": [1, 2]}) == stage_key("plan", {"b": [1, 2], "a": 1})
    assert stage_key("plan", {"a": 1}) != stage_key("plan", {"a": 2}) != stage_key("slim", {"a": 2})


def test_a_record_is_cached_until_its_files_change(tmp_path):
    out = tmp_path / "f.json"
    out.write_text("{}")
    m = Manifest(tmp_path)
    m.record("plan", "k1", [out], 1.5)
    m.save()
    again = Manifest(tmp_path)
    assert again.cached("plan", "k1") and not again.cached("plan", "k2") and not again.altered("plan")
    out.write_text('{"x": 1}')
    assert not Manifest(tmp_path).cached("plan", "k1") and Manifest(tmp_path).altered("plan")
    again.invalidate("plan")
    assert not again.stage("plan")
