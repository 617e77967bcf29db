"""Damaged artifacts are detected, never silently used: ``slimexport verify`` names them, a rebuild rebuilds the
stage that owns them, and the loaders raise :class:`ArtifactError`. Manifests that point outside their folder, or
that come from another slimexport version or another model, are refused with a message saying what differs.

Every test damages its own copy of the session's build folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
from _rel_helpers import SMALL, build_config, copy_build, read_manifest, strip_timings, write_manifest

from slimexport.cli.main import main
from slimexport.errors import ArtifactError, IncompatibleArtifactError, SlimExportError

STATS = "calib/stats.safetensors"
SLIM_WEIGHTS = "slim_unet/diffusion_pytorch_model.safetensors"
SLIM_PLAN = "slim_unet/slim_plan.json"
ONNX_DATA = "onnx/slim/model.onnx_data"
PLAN = "plan.json"
MANIFEST = "manifest.json"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path) -> None:
    """XOR a run of bytes in the last quarter (tensor data, not the header: the file still parses)."""
    data = bytearray(path.read_bytes())
    start = len(data) * 3 // 4
    for i in range(start, min(start + 4096, len(data) - 8)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def edit_slim_plan(path) -> None:
    """Valid JSON, wrong shapes: one attention's rank changed."""
    meta = json.loads(path.read_text())
    block = sorted(k for k, v in meta["shapes"].items() if "attn1" in v)[0]
    meta["shapes"][block]["attn1"]["rank_qk"] += 1
    path.write_text(json.dumps(meta))


def edit_plan(path) -> None:
    plan = json.loads(path.read_text())
    name = sorted(plan["ranks"])[0]
    plan["ranks"][name] += 8
    path.write_text(json.dumps(plan))


def json_list(path) -> None:
    path.write_text("[]")  # valid JSON, not an object


DAMAGE = {"truncate": truncate, "flip": flip, "edit": None, "json_list": json_list}


def _damage(folder, rel, how):
    fn = {"edit": edit_slim_plan if rel == SLIM_PLAN else edit_plan}.get(how) or DAMAGE[how]
    fn(folder / rel)


def _cli(argv, capsys) -> tuple[int, str]:
    rc = main(["-q", *argv])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# --- slimexport verify ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel, how, names", [
    (STATS, "truncate", [STATS, "integrity"]),
    (STATS, "flip", [STATS, "altered"]),
    (SLIM_WEIGHTS, "truncate", [SLIM_WEIGHTS, "not a readable safetensors file"]),
    (ONNX_DATA, "flip", [ONNX_DATA, "slim_export"]),
    (ONNX_DATA, "truncate", [ONNX_DATA]),
    (SLIM_PLAN, "edit", [SLIM_PLAN, "do not fit the plan's shapes"]),
    (PLAN, "edit", [PLAN, "integrity"]),
    (MANIFEST, "truncate", ["manifest", "is corrupted"]),
    (MANIFEST, "json_list", ["manifest.json is not a JSON object"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_verify_names_the_damaged_artifact(built, tmp_path, capsys, rel, how, names):
    folder = copy_build(built, tmp_path / "b")
    _damage(folder, rel, how)
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 1, msg
    for fragment in names:
        assert fragment in msg, msg
    assert "Traceback" not in msg


def test_verify_that_cannot_load_an_artifact_marks_the_folder_failed(built, tmp_path, capsys):
    """report.json/.md and the manifest's results say FAILED, not the build's old PASSED."""
    folder = copy_build(built, tmp_path / "b")
    truncate(folder / SLIM_WEIGHTS)
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 1, msg
    rep = json.loads((folder / "report.json").read_text())
    assert rep["passed"] is False and SLIM_WEIGHTS in rep["parity"]["integrity"]["reason"]
    assert "FAILED" in (folder / "report.md").read_text()
    m = read_manifest(folder)
    assert m["results"]["passed"] is False and m["results"]["parity"] == {"integrity": False} and "verify" not in m["stages"]


@pytest.mark.parametrize("what", ["slim_unet/slim_plan.json", "slim_unet"])
def test_verify_of_a_folder_missing_its_slim_unet_fails_naming_it(built, tmp_path, capsys, what):
    import shutil

    folder = copy_build(built, tmp_path / "b")
    target = folder / what
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 1 and f"{SLIM_PLAN}: missing" in msg and "from_pretrained" not in msg, msg
    assert read_manifest(folder)["results"]["passed"] is False
    assert json.loads((folder / "report.json").read_text())["passed"] is False


def test_verify_and_bench_elsewhere_leave_the_builds_results_alone(built, tmp_path, capsys, monkeypatch):
    """On another machine (device or torch) the checks report, but do not become the build's cached stages."""
    folder = copy_build(built, tmp_path / "b")
    before = {k: read_manifest(folder)["stages"][k] for k in ("verify", "bench")}
    files = {n: (folder / n).read_bytes() for n in ("verify.json", "bench.json")}
    monkeypatch.setattr("slimexport.folder.same_machine", lambda *a: False)
    assert _cli(["verify", str(folder)], capsys)[0] == 0
    assert _cli(["bench", str(folder), "--iterations", "3"], capsys)[0] == 0
    m = read_manifest(folder)
    assert {k: m["stages"][k] for k in ("verify", "bench")} == before
    assert {n: (folder / n).read_bytes() for n in files} == files
    assert json.loads((folder / "report.json").read_text())["speed"]["iterations"] == 3  # the report shows this run
    monkeypatch.undo()
    assert _cli(["verify", str(folder)], capsys)[0] == 0  # and the folder is intact


@pytest.mark.parametrize("content", ["[]", "{}"])
def test_bench_with_a_damaged_report_says_to_verify_first(built, tmp_path, capsys, content):
    folder = copy_build(built, tmp_path / "b")
    (folder / "report.json").write_text(content)
    rc, msg = _cli(["bench", str(folder)], capsys)
    assert rc == 1 and "run slimexport verify" in msg and "Traceback" not in msg, msg
    assert _cli(["verify", str(folder)], capsys)[0] == 0 and json.loads((folder / "report.json").read_text())["params"]


def test_a_manifest_that_records_no_stages_vouches_for_nothing(built, tmp_path, capsys):
    folder = copy_build(built, tmp_path / "b")
    data = read_manifest(folder)
    data["stages"] = {}
    write_manifest(folder, data)
    edit_plan(folder / PLAN)
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 1 and "export_slim: no record in the manifest" in msg, msg


@pytest.mark.slow
def test_a_failed_verify_does_not_decide_a_later_build(built, tmp_path, capsys):
    """verify on altered ONNX data fails; the build that then re-exports it checks it afresh (it reused the failed
    verdict, so build failed while verify then passed)."""
    from slimexport.api import build

    folder = copy_build(built, tmp_path / "b")
    flip(folder / ONNX_DATA)
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 1 and "slim_export" in msg, msg
    m = read_manifest(folder)
    assert m["results"]["passed"] is False and m["results"]["parity"]["slim_export"] is False and "verify" not in m["stages"]
    res = build(build_config(), out=folder, progress=False, cache_dir=tmp_path / "cache")
    stages = res.report["stages"]
    assert res.passed and not stages["export_slim"]["cached"] and not stages["verify"]["cached"], stages
    assert read_manifest(folder)["results"]["passed"] is True
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 0 and "verdict: PASSED" in msg, msg
    rc, msg = _cli(["bench", str(folder), "--iterations", "12"], capsys)
    m = read_manifest(folder)
    assert rc == 0 and m["results"]["speedup"] == json.loads((folder / "bench.json").read_text())["speedup"]
    assert m["stages"]["bench"]["seconds"] > 0 and m["stages"]["verify"]["seconds"] > 0


# --- the loaders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_calib_stats_load_raises(built, tmp_path, how):
    from slimexport.calibrate.stats import CalibStats

    folder = copy_build(built, tmp_path / "b")
    _damage(folder, STATS, how)
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        CalibStats.load(folder / "calib")
    (folder / "calib" / "stats.json").write_text("{\"format\": ")
    with pytest.raises(ArtifactError, match="is corrupted"):
        CalibStats.load(folder / "calib")


@pytest.mark.parametrize("rel, how, match", [
    (SLIM_WEIGHTS, "truncate", "does not match its recorded sha256"),
    (SLIM_WEIGHTS, "flip", "truncated or altered"),
    (SLIM_PLAN, "edit", "do not fit the plan's shapes"),
    (SLIM_PLAN, "truncate", "is corrupted"),
])
def test_load_slim_unet_raises(built, tmp_path, rel, how, match):
    from slimexport.slim.apply import load_slim_unet

    folder = copy_build(built, tmp_path / "b")
    _damage(folder, rel, how)
    with pytest.raises(ArtifactError, match=match):
        load_slim_unet(folder / "slim_unet")


def test_read_export_with_verify_raises(built, tmp_path):
    from slimexport.engines.onnx_export import read_export

    folder = copy_build(built, tmp_path / "b")
    flip(folder / ONNX_DATA)
    read_export(folder / "onnx" / "slim")  # the record alone still reads
    with pytest.raises(ArtifactError, match="model.onnx_data does not match its recorded sha256"):
        read_export(folder / "onnx" / "slim", verify=True)


# --- a rebuild rebuilds what was damaged, and ends where a clean build ends ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rel, how, stage", [
    (STATS, "flip", "calibrate"),
    (SLIM_WEIGHTS, "truncate", "decompose"),
    (SLIM_PLAN, "edit", "decompose"),
    (ONNX_DATA, "flip", "export_slim"),
    (PLAN, "edit", "allocate"),
    (MANIFEST, "truncate", None),
])
def test_rebuild_detects_the_damage_and_rebuilds_the_stage(built, tmp_path, caplog, rel, how, stage):
    from slimexport.api import build

    folder = copy_build(built, tmp_path / "b")
    want_sha = _sha(built / rel) if rel != MANIFEST else None
    _damage(folder, rel, how)
    with caplog.at_level(logging.WARNING, logger="slimexport"):
        res = build(build_config(), out=folder, progress=False, cache_dir=tmp_path / "cache")
    stages = res.report["stages"]
    if stage is None:  # an unreadable manifest trusts nothing: every stage reruns
        assert not any(v["cached"] for k, v in stages.items() if k != "load"), stages
    else:
        assert not stages[stage]["cached"], stages
        assert not stages["verify"]["cached"] and not stages["bench"]["cached"], stages  # rebuilt files: checked afresh
        assert f"{rel} is altered" in caplog.text or f"{rel} is missing" in caplog.text, caplog.text
        assert _sha(folder / rel) == want_sha  # rebuilt, byte for byte what the clean build wrote
    assert stages["calibrate"]["cached"] is (stage not in ("calibrate", None))
    original = json.loads((built / "report.json").read_text())
    assert strip_timings(res.report) == strip_timings(original)
    assert res.passed
    integrity = {p: why for s in read_manifest(folder)["stages"] for p, why in _altered(folder, s)}
    assert not integrity


def _altered(folder, stage):
    from slimexport.cache import Manifest

    return Manifest(folder).altered(stage)


# --- manifests that point outside their folder ----------------------------------------------------------------


@pytest.mark.parametrize("bad_path", ["/etc/hostname", "../outside.txt", "calib/../../outside.txt", "escape/link"])
def test_manifest_paths_outside_the_folder_are_refused(built, tmp_path, capsys, bad_path):
    from slimexport.api import build

    folder = copy_build(built, tmp_path / "b")
    (tmp_path / "outside.txt").write_text("outside\n")
    if bad_path.startswith("escape"):
        (folder / "escape").mkdir()
        os.symlink(tmp_path / "outside.txt", folder / "escape" / "link")  # inside by name, outside once resolved
    data = read_manifest(folder)
    data["stages"]["calibrate"]["files"][bad_path] = hashlib.sha256(b"outside\n").hexdigest()
    write_manifest(folder, data)

    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 1 and "outside" in msg and repr(bad_path) in msg, msg
    assert "Traceback" not in msg
    with pytest.raises(ArtifactError, match="outside"):
        build(build_config(), out=folder, progress=False, cache_dir=tmp_path / "cache")


def test_check_inside_refuses_escapes(tmp_path):
    from slimexport.artifacts import check_inside

    assert check_inside(tmp_path, "calib/stats.json") == (tmp_path / "calib" / "stats.json").resolve()
    for bad in ("/abs/path", "..", "a/../../b", "../b"):
        with pytest.raises(ArtifactError, match="outside"):
            check_inside(tmp_path, bad)


def test_built_manifest_and_reports_hold_no_absolute_or_parent_paths(built):
    def strings(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)
        elif isinstance(obj, str):
            yield obj

    manifest = read_manifest(built)
    for stage in manifest["stages"].values():
        for rel in stage["files"]:
            assert not os.path.isabs(rel) and ".." not in rel.split("/"), rel
    for name in ("manifest.json", "report.json", "bench.json", "verify.json"):
        data = json.loads((built / name).read_text())
        bad = [s for s in strings(data) if str(built) in s or s.startswith("/") or "/../" in s]
        assert not bad, (name, bad)


# --- folders from another version or another model --------------------------------------------------------------


def test_folder_from_another_slimexport_version_is_refused(built, tmp_path, capsys):
    from slimexport.api import build

    folder = copy_build(built, tmp_path / "b")
    data = read_manifest(folder)
    data["slimexport_version"] = "0.0.1"
    write_manifest(folder, data)
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 2 and "was built by slimexport 0.0.1, this is" in msg and "Traceback" not in msg
    with pytest.raises(IncompatibleArtifactError, match=r"built by slimexport 0\.0\.1"):
        build(build_config(), out=folder, progress=False, cache_dir=tmp_path / "cache")
    assert read_manifest(folder)["slimexport_version"] == "0.0.1"  # refused, not overwritten


def test_folder_of_another_model_is_refused(built, tmp_path, capsys):
    """Building another model into a folder of ``tiny``, or verifying a folder whose recorded weights are not the
    model's, is refused, saying what differs."""
    from slimexport.models.load import build_unet
    from slimexport.models.registry import TINY_UNET

    folder = copy_build(built, tmp_path / "b")
    other = tmp_path / "other_unet"
    build_unet(TINY_UNET, seed=1).save_pretrained(other, safe_serialization=True)
    rc, msg = _cli(["build", "--model", str(other), *SMALL, "--out", str(folder)], capsys)
    assert rc == 2, msg
    assert "holds a build of another model/weights" in msg and "'tiny' there" in msg and str(other) in msg
    assert "Traceback" not in msg

    data = read_manifest(folder)
    data["model"]["fingerprint"] = "recipe:" + "0" * 64
    write_manifest(folder, data)
    rc, msg = _cli(["verify", str(folder)], capsys)
    assert rc == 2 and "is not the one" in msg and "fingerprint" in msg and "Traceback" not in msg


# --- caches keyed by content ------------------------------------------------------------------------------------


def test_altered_shared_calibration_cache_is_not_trusted(tmp_path, caplog):
    from slimexport.api import compress
    from slimexport.config import AllocConfig, CalibConfig, CompressConfig

    cfg = CompressConfig(model="tiny", calib=CalibConfig(num_prompts=2, num_steps=2, num_bins=1, batch_size=2),
                         alloc=AllocConfig(budget=0.8))
    first = compress(cfg, out=tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    (shared,) = (tmp_path / "cache" / "calib").iterdir()
    tensors = shared / "stats.safetensors"
    data = tensors.read_bytes()
    tensors.unlink()  # a new file (the cache is hard-linked to folder a: editing in place would damage both)
    tensors.write_bytes(data[:-64] + bytes(64))
    with caplog.at_level(logging.WARNING, logger="slimexport"):
        second = compress(cfg, out=tmp_path / "b", cache_dir=tmp_path / "cache", progress=False)
    assert not second.stages["calibrate"].cached
    assert "shared calibration cache" in caplog.text and "is unusable" in caplog.text
    assert _sha(tmp_path / "b" / STATS) == _sha(first.stats_dir / "stats.safetensors")


def test_edited_prompts_file_recalibrates(tmp_path):
    """The calibration cache is keyed by the prompts file's content, not only by its path."""
    from slimexport.api import compress
    from slimexport.config import AllocConfig, CalibConfig, CompressConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na plain blue sky\n")
    cfg = CompressConfig(model="tiny", calib=CalibConfig(num_prompts=2, num_steps=2, num_bins=1, batch_size=2,
                                                         prompts_file=str(prompts)), alloc=AllocConfig(budget=0.8))
    compress(cfg, out=tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    assert compress(cfg, out=tmp_path / "a", cache_dir=tmp_path / "cache", progress=False).stages["calibrate"].cached
    prompts.write_text("a city street at night\na bowl of fruit\n")
    again = compress(cfg, out=tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    assert not again.stages["calibrate"].cached
    with pytest.raises(SlimExportError, match="prompts file"):
        prompts.write_text("")
        compress(cfg, out=tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
