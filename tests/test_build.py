"""``slimexport build`` on ``tiny``: the folder layout, report keys, stage caching, and ``verify`` failing on a
corrupted slim weight."""

import json
import re
import shutil

import pytest

from slimexport.api import build
from slimexport.cli.main import main
from slimexport.config import AllocConfig, BenchConfig, BuildConfig, CalibConfig, CompressConfig

CFG = BuildConfig(compress=CompressConfig(model="tiny", calib=CalibConfig(num_prompts=4, num_steps=4, num_bins=2, batch_size=4),
                                          alloc=AllocConfig(budget=0.73)),
                  bench=BenchConfig(max_seconds=3.0), pipeline=True)  # a short bench budget: tests


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    first = build(CFG, out=root / "tiny", progress=False, cache_dir=root / "cache")
    return root, first


def test_layout_and_report_keys(built):
    root, res = built
    out = root / "tiny"
    for rel in ("manifest.json", "report.json", "report.md", "slim_unet/slim_plan.json", "onnx/dense/model.onnx",
                "onnx/dense/model.onnx_data", "onnx/slim/model.onnx", "onnx/slim/model.onnx_data", "calib/stats.safetensors"):
        assert (out / rel).exists(), rel
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"] == "tiny" and rep["budget"] == 0.73
    assert rep["budget_kept"]["of"] == "targeted parameters" and abs(rep["budget_kept"]["kept"] - 0.73) < 0.01
    assert "of the targeted parameters kept (budget 0.73)" in (out / "report.md").read_text()
    assert set(rep["params"]) >= {"dense_total", "slim_total", "targeted_dense", "targeted_slim"}
    for key in ("dense_export", "slim_export", "slim_vs_dense"):
        assert set(rep["parity"][key]) >= {"max_abs", "max_rel", "p99_abs", "mean_abs", "cosine", "sqnr_db", "passed"}
    assert rep["parity"]["dense_export"]["passed"] and rep["parity"]["slim_export"]["passed"]
    assert rep["parity"]["dense_export"]["max_abs"] < 1e-4
    s = rep["speed"]
    assert s["backend"] == "onnxruntime" and s["iterations"] >= 20 and s["speedup"] > 0 and s["dtype"] == "fp32"
    assert s["stopped_by"] in ("interval", "time") and s["target_ci"] == 0.02 and s["max_seconds"] == 3.0
    assert "Backend `onnxruntime` fp32 on " in (out / "report.md").read_text()
    assert set(s["dense_ms"]) >= {"p50", "p90", "p99"} and set(s["slim_ms"]) >= {"p50", "p90", "p99"}
    assert all(set(v) == {"seconds", "cached"} for v in rep["stages"].values())
    lo, hi = s["speedup_ci95"]
    assert lo <= s["speedup"] <= hi
    md = (out / "report.md").read_text()
    threads = s["dense_engine"]["threads"]
    assert isinstance(threads, int) and f"({threads} threads)" in md
    assert f"95% interval {lo:.3f}–{hi:.3f}" in md
    manifest = json.loads((out / "manifest.json").read_text())
    for k in ("model", "onnx", "io", "profile", "versions", "results", "slim_weights"):
        assert k in manifest, k
    assert manifest["onnx"]["slim"]["sha256"] and manifest["io"]["inputs"][1]["dtype"] == "float32"
    assert res.passed
    # figures: tiny's weights are random, so latent statistics stand where images would
    assert set(rep["figures"]) == {"latents", "ranks", "eps_per_timestep", "trajectory_cosine", "latency"}
    assert all((out / f).read_bytes().startswith(b"\x89PNG") for f in rep["figures"].values())
    assert md.count("](figures/") == 5 and "figures" in manifest["stages"]
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 5
    # pipeline/: the ONNX pipeline folder with the slim UNet (generation is tested in tests/engines/test_pipeline_folder.py)
    assert (out / "pipeline" / "model_index.json").exists() and (out / "pipeline" / "unet" / "model.onnx").exists()
    assert manifest["pipeline"]["path"] == "pipeline" and "pipeline" in manifest["stages"]


def test_second_run_is_a_cache_hit(built):
    root, first = built
    again = build(CFG, out=root / "tiny", progress=False, cache_dir=root / "cache")
    stages = again.report["stages"]
    assert all(stages[s]["cached"] for s in ("calibrate", "allocate", "decompose", "export_dense", "export_slim", "verify", "bench",
                                             "figures"))
    assert again.report["parity"] == first.report["parity"]


def test_no_figures_draws_none_and_the_report_reads_without_them(built, tmp_path):
    root, _ = built
    res = build(CFG, out=tmp_path / "nofig", progress=False, cache_dir=root / "cache", figures=False)
    assert res.passed and res.report["figures"] is None and "figures" not in res.report["stages"]
    assert not (tmp_path / "nofig" / "figures").exists()
    assert "figures" not in json.loads((tmp_path / "nofig" / "manifest.json").read_text())["stages"]
    md = (tmp_path / "nofig" / "report.md").read_text()
    assert "## " in md and ".png" not in md and (tmp_path / "nofig" / "report.html").exists()


def test_verify_and_bench_can_be_rerun_on_a_healthy_folder(built, tmp_path, capsys):
    """verify and bench rewrite verify.json/bench.json: a later verify must not call its own outputs altered."""
    root, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(root / "tiny", copy)
    for args in (["verify"], ["verify"], ["bench", "--iterations", "3"], ["verify"]):
        rc = main(["-q", *args, str(copy)])
        out = capsys.readouterr()
        assert rc == 0, (args, out.out + out.err)
        if args == ["verify"]:  # cosines with their digits (0.999958 was printed as "1"), the gated metrics, a verdict
            assert re.search(r"slim_export +max_abs \S+, cosine (0\.\d{6}|1\.000000)", out.out), out.out
            assert re.search(r"slim_vs_dense +mean eps error 0\.\d{4} \(gate <= 0\.5\), final-latent cosine", out.out), out.out
            assert "integrity      every recorded artifact matches its sha256" in out.out and "verdict: PASSED" in out.out
        else:
            assert "speed (onnxruntime fp32, " in out.out, out.out
    rep = json.loads((copy / "report.json").read_text())
    assert rep["parity"]["integrity"]["passed"] and rep["speed"]["iterations"] == 3
    assert "integrity" not in json.loads((copy / "verify.json").read_text())  # the stage's output, as build writes it
    again = build(CFG, out=copy, progress=False, cache_dir=root / "cache")  # a later build of the same folder
    stages = again.report["stages"]
    assert stages["verify"]["cached"] and not stages["bench"]["cached"]  # bench ran with other settings: measured again
    assert again.passed and again.report["speed"]["iterations"] >= 20 and "integrity" not in again.report["parity"]


def test_bench_without_a_report_writes_nothing(built, tmp_path, capsys):
    root, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(root / "tiny", copy)
    (copy / "report.json").unlink()
    before = (copy / "bench.json").read_bytes()
    assert main(["-q", "bench", str(copy)]) != 0
    err = capsys.readouterr().err
    assert "report" in err and "run slimexport verify" in err and (copy / "bench.json").read_bytes() == before
    original = json.loads((root / "tiny" / "report.json").read_text())
    (copy / "report.md").unlink()
    assert main(["-q", "verify", str(copy)]) == 0  # verify writes the report again, from plan.json and bench.json
    remade = json.loads((copy / "report.json").read_text())
    assert remade["params"] == original["params"] and remade["speed"] == original["speed"] and remade["passed"]
    assert remade["budget_kept"] == original["budget_kept"] and "Verdict: PASSED" in (copy / "report.md").read_text()
    assert main(["-q", "bench", str(copy), "--iterations", "3"]) == 0


def test_corrupted_slim_weight_fails_verify_naming_the_comparison(built, tmp_path, capsys):
    root, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(root / "tiny", bad)
    weights = bad / "slim_unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 4000, len(data) - 8, 4):  # scramble the tail of the tensor data (still a readable file)
        data[i] ^= 0x5A
    weights.write_bytes(bytes(data))
    rc = main(["-q", "verify", str(bad)])
    err = capsys.readouterr()
    assert rc == 1
    text = err.out + err.err
    assert "slim_export" in text and "integrity" in text
    assert "dense_export" in text and "FAIL" in text


def test_pipeline_of_a_model_without_vae_is_refused_up_front(tmp_path, capsys):
    code = main(["build", "--model", "digits", "--pipeline", "--out", str(tmp_path / "d")])
    assert code == 2 and "pipeline folder needs a text-to-image pipeline" in capsys.readouterr().err
    assert not (tmp_path / "d" / "calib").exists()  # refused before calibration


def test_tensorrt_without_tensorrt_is_a_usage_error(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    rc = main(["build", "--model", "tiny", "--backend", "tensorrt", "--out", str(tmp_path / "x")])
    msg = capsys.readouterr().err
    assert rc == 2 and "slimexport[trt]" in msg


def test_torch_backend_builds_and_verifies_digits(tmp_path):
    """The model backends take the text length off the export: ``digits`` has 6 tokens, not CLIP's 77."""
    from slimexport.config import BenchConfig

    cfg = BuildConfig(compress=CompressConfig(model="digits", calib=CalibConfig(num_prompts=8, num_steps=4, num_bins=2, batch_size=8),
                                              alloc=AllocConfig(budget=0.73)),
                      bench=BenchConfig(iterations=3), backend="torch", engine_device="cpu")
    res = build(cfg, out=tmp_path / "digits", progress=False, cache_dir=tmp_path / "cache")
    assert res.passed, res.report["parity"]
    assert res.report["speed"]["dense_engine"]["backend"] == "torch"
    assert all(res.report["parity"][k]["max_abs"] < 1e-4 for k in ("dense_export", "slim_export"))


def test_verify_fits_the_fixed_inputs_into_a_one_prompt_profile(built):
    """--batch 1,1,1 makes engines of 2 UNet rows: verify uses one prompt (not the default two) instead of failing."""
    root, _ = built
    res = build(CFG.replace(batch=(1, 1, 1)), out=root / "one", progress=False, cache_dir=root / "cache")
    assert res.passed, res.report["parity"]
    prof = res.report["profile"]
    rows = res.report["parity"]["dense_export"]["numel"] // (4 * prof["opt_height"] * prof["opt_width"] * 5)  # 5 timesteps
    assert prof["max_batch"] == 2 and rows == 2


def test_a_relative_model_path_falls_back_to_the_recorded_folder(built, tmp_path, monkeypatch):
    """A build made through the Python API with a relative path, read from another folder: the manifest's source."""
    from slimexport.errors import ModelNotFoundError
    from slimexport.folder import _load_build
    from slimexport.models import load

    root, _ = built
    out = tmp_path / "copy"
    shutil.copytree(root / "tiny", out)
    m = json.loads((out / "manifest.json").read_text())
    m["build_config"]["compress"]["model"] = "rel/pipe"
    m["model"]["source"] = f"local:{tmp_path}"
    (out / "manifest.json").write_text(json.dumps(m))
    real, asked = load.load_model, []

    def fake(model, **kw):
        asked.append(model)
        if model == "rel/pipe":
            raise ModelNotFoundError("'rel/pipe' is neither a registry name, an existing folder nor a hub id")
        return real("tiny", **kw)  # stands in for the recorded folder

    monkeypatch.setattr(load, "load_model", fake)
    folder, _, cfg, bundle = _load_build(out)
    assert asked == ["rel/pipe", str(tmp_path)] and bundle.identity() == m["model"]["fingerprint"]
    m["model"]["source"] = f"local:{tmp_path / 'gone'}"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelNotFoundError, match="rel/pipe"):
        _load_build(out)
