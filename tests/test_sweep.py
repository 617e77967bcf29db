"""``slimexport sweep`` on ``tiny``: the three outputs, reuse of finished points, resuming, the Pareto front, and
one-line errors for a bad grid."""

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from slimexport.cli.main import main
from slimexport.config import BuildConfig
from slimexport.engines.base import build_engine
from slimexport.engines.onnx_export import export_unet_onnx
from slimexport.engines.select import engine_config, engine_profile
from slimexport.errors import UsageError
from slimexport.models import load_model
from slimexport.models.arch import context_dim
from slimexport.sweep import SweepConfig, pareto_front, point_id, sweep
from slimexport.verify import parity
from slimexport.verify.run import run_verify

# A short calibration and bench: the whole file runs in well under a minute on one CPU thread.
ARGS = ["--model", "tiny", "--calib-prompts", "4", "--calib-steps", "2", "--calib-bins", "2", "--calib-batch", "4",
        "--iterations", "10", "--warmup", "1", "--budgets", "1,0.6", "--targets", "attn,ffn", "--allocations", "softmax,greedy"]
IDS = ["attn+ffn-softmax-b1", "attn+ffn-greedy-b1", "attn+ffn-softmax-b0.6", "attn+ffn-greedy-b0.6"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads wait on each other (a tiny UNet call: 30 ms vs 3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("sweep")
    monkeypatch_module.setenv("SLIMEXPORT_CACHE_DIR", str(root / "cache"))
    out = root / "sw"
    assert main(["-q", "sweep", *ARGS, "--out", str(out)]) == 0
    return root, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_pareto_front_on_a_hand_made_set():
    pts = [(1.0, 0.0), (1.2, 0.01), (1.1, 0.02), (1.5, 0.2), (1.5, 0.3), (0.9, 0.0), (1.2, 0.01), (2.0, float("nan"))]
    # (1.1, 0.02) is beaten by (1.2, 0.01); (1.5, 0.3) by (1.5, 0.2); (0.9, 0) by (1.0, 0); equal pairs both stay; NaN never.
    assert pareto_front(pts) == [True, True, False, True, False, False, True, False]
    assert pareto_front([]) == []
    assert pareto_front([(1.3, 0.5)]) == [True]
    assert pareto_front([(1.0, None), (0.5, 1.0)]) == [False, True]


def test_sweep_writes_the_frontier(swept):
    _, out = swept
    fr = json.loads((out / "frontier.json").read_text())
    assert fr["format"] == "slimexport.frontier/1" and fr["model"] == "tiny" and fr["backend"] == "onnxruntime"
    assert [p["id"] for p in fr["points"]] == IDS and fr["complete"] and fr["planned_points"] == 4
    assert fr["command"].startswith("slimexport -q sweep --model tiny") and "--budgets 1,0.6" in fr["command"] and fr["environment"]["device_name"]
    for p in fr["points"]:
        assert p["speedup"] > 0 and p["dense_ms_p50"] > 0 and p["iterations"] == 10
        lo, hi = p["speedup_ci95"]
        assert lo <= p["speedup"] <= hi
        assert 0 < p["params"]["targeted_ratio"] <= 1 and 0 < p["macs"]["ratio"] <= 1
        assert p["export_parity"] == {"dense": True, "slim": True}
        assert set(p["fidelity"]) >= {"eps_rel_error_mean", "latent_cosine", "final_rel_error"}
        assert (out / "points" / p["id"] / "report.json").exists() and (out / "points" / p["id"] / "onnx" / "slim").is_dir()
    by_id = {p["id"]: p for p in fr["points"]}
    for a in ("softmax", "greedy"):  # budget 1 is the dense model: ε error at rounding level, cosine 1
        full = by_id[point_id(1.0, ("attn", "ffn"), a)]
        assert full["fidelity"]["eps_rel_error_mean"] < 1e-4 and full["fidelity"]["latent_cosine"] > 0.9999
        assert full["params"]["targeted_ratio"] == 1.0 and full["passed"]
        cut = by_id[point_id(0.6, ("attn", "ffn"), a)]
        assert cut["fidelity"]["eps_rel_error_mean"] > 1e-3 and cut["params"]["targeted_ratio"] < 0.65
        assert cut["macs"]["ratio"] < 1.0
    # one calibration: every point after the first reused it (through the shared cache)
    assert not fr["points"][0]["stages"]["calibrate"]["cached"]
    assert all(p["stages"]["calibrate"]["cached"] for p in fr["points"][1:])
    # one dense export, in dense/, none in the points
    assert (out / "dense" / "onnx" / "model.onnx").exists() and not any((out / "points").glob("*/onnx/dense"))
    # the Pareto flags are pareto_front's of (speed-up, ε error)
    assert [p["pareto"] for p in fr["points"]] == pareto_front([(p["speedup"], p["fidelity"]["eps_rel_error_mean"]) for p in fr["points"]])
    assert fr["pareto"] and set(fr["pareto"]) == {p["id"] for p in fr["points"] if p["pareto"]}
    md = (out / "frontier.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 4 and sum(r.startswith("| ★ |") for r in rows) == len(fr["pareto"])
    speeds = [float(r.split("|")[8].split("×")[0]) for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG")


def test_a_rerun_reuses_every_point(swept, monkeypatch):
    _, out = swept
    before = json.loads((out / "frontier.json").read_text())

    def boom(*a, **k):
        raise AssertionError("a finished point was computed again")

    monkeypatch.setattr("slimexport.api.compress", boom)
    monkeypatch.setattr("slimexport.engines.base.build_engine", boom)
    assert main(["-q", "sweep", *ARGS, "--out", str(out)]) == 0
    after = json.loads((out / "frontier.json").read_text())
    assert after["points"] == before["points"]


def test_an_interrupted_point_resumes_from_its_stages(swept):
    """A point killed after its bench (no report.json) redoes only its record; the other points are reused whole."""
    _, out = swept
    (out / "points" / IDS[2] / "report.json").unlink()
    res = sweep(out=out, progress=False, model="tiny", calib_prompts=4, calib_steps=2, calib_bins=2, calib_batch=4,
                iterations=10, warmup=1, budgets="1,0.6", targets=["attn,ffn"], allocations="softmax,greedy")
    assert res.reused == {i: i != IDS[2] for i in IDS}
    p = next(p for p in res.frontier["points"] if p["id"] == IDS[2])
    assert all(s["cached"] for k, s in p["stages"].items() if k != "load"), p["stages"]


def test_a_bad_grid_is_one_line_and_writes_nothing(tmp_path, capsys):
    for extra, words in ((["--budgets", "0.9,1.5"], "outside (0, 1]"), (["--budgets", ","], "grid is empty"),
                         (["--budgets", "0.8", "--allocations", "softmax,softmax"], "twice"),
                         (["--budgets", "0.8", "--targets", "attn,ffn", "--targets", "ffn,attn"], "twice"),
                         (["--budgets", "0.8", "--targets", "attn,mlp"], "--targets attn,mlp"),
                         (["--budgets", "0.8,x"], "not a number")):
        assert main(["sweep", "--model", "tiny", *extra, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="judge scores digits only"):
        sweep(SweepConfig(budgets=(0.8,), judge_samples=20), out=tmp_path / "o", model="tiny")
    with pytest.raises(UsageError, match="multiple of 10"):
        SweepConfig(judge_samples=15)


def test_config_round_trip():
    cfg = SweepConfig(budgets=(0.9, 0.6), targets=(("ffn", "attn"), ("attn", "ffn", "resnet")), allocations=("greedy",))
    assert cfg.targets == (("attn", "ffn"), ("attn", "ffn", "resnet"))
    again = SweepConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and len(again.points()) == 4
    assert [p.budget for p in again.points()] == [0.9, 0.9, 0.6, 0.6]
    assert again.points()[0].cfg.compress.alloc.method == "greedy" and not math.isnan(again.budgets[0])
    base = BuildConfig().compress.alloc  # no --targets or --allocations: the build's own
    assert SweepConfig(budgets=(0.8,)).targets == (base.targets,) and SweepConfig(budgets=(0.8,)).allocations == (base.method,)


def test_sweep_with_step_caching(tmp_path, monkeypatch):
    """--cache N: the dense pair is made once in dense/, each point adds its slim pair, and the frontier gets the
    per-image rows (dense cached, slim, slim cached) with their Pareto front, in all three outputs."""
    monkeypatch.setenv("SLIMEXPORT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "sw"
    args = [*ARGS[:ARGS.index("--budgets")], "--budgets", "0.6", "--targets", "attn,ffn", "--allocations", "softmax,greedy",
            "--cache", "2", "--out", str(out)]
    assert main(["-q", "sweep", *args]) == 0
    fr = json.loads((out / "frontier.json").read_text())
    cache = fr["cache"]
    assert cache["describe"] and cache["steps"] > 0
    assert [x["id"] for x in cache["rows"]] == ["dense+cache", "attn+ffn-softmax-b0.6", "attn+ffn-softmax-b0.6+cache",
                                                "attn+ffn-greedy-b0.6", "attn+ffn-greedy-b0.6+cache"]
    assert [x["variant"] for x in cache["rows"]] == ["cached", "slim", "cached+slim", "slim", "cached+slim"]
    for x in cache["rows"]:
        assert x["speedup"] > 0 and 0 < x["latent_cosine"] <= 1 + 1e-9 and x["final_rel_error"] > 0
    assert [x["pareto"] for x in cache["rows"]] == pareto_front([(x["speedup"], x["final_rel_error"]) for x in cache["rows"]])
    for p in fr["points"]:  # each point's own check: the pair parity passed, the dense-cached loop timed beside it
        c = p["cache"]
        assert c["pair_parity_passed"] and set(c["speedup"]) == {"dense", "slim", "cached", "cached+slim"}
        assert (out / "points" / p["id"] / "stepcache" / "check.json").exists()
        assert (out / "points" / p["id"] / "onnx" / "slim-cache" / "shallow").is_dir()
        # the cached slim UNet departs further from dense than the slim UNet alone (the cache's error adds on)
        assert c["fidelity"]["cached+slim"]["final_rel_error"] > c["fidelity"]["slim"]["final_rel_error"]
    # one dense pair, shared: made in dense/, none in the points
    assert (out / "dense" / "onnx" / "dense-cache" / "full").is_dir()
    assert not any((out / "points").glob("*/onnx/dense-cache"))
    md = (out / "frontier.md").read_text()
    section = md.split("## Step caching", 1)[1]
    assert sum(line.startswith("| ") and "`" in line for line in section.splitlines()) == 5
    assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG")
    # a rerun reuses every point, cached rows included
    assert main(["-q", "sweep", *args]) == 0
    again = json.loads((out / "frontier.json").read_text())
    assert again["cache"]["rows"] == cache["rows"]


def test_verify_reuses_the_dense_side_across_points(monkeypatch):
    """A sweep verifies many slim UNets against one dense UNet: with a memo the dense side runs once, and the
    results equal those computed without it."""
    bundle = load_model("tiny")
    dense = bundle.unet.eval()
    slims = []
    for scale in (0.9, 1.1):
        s = copy.deepcopy(dense)
        with torch.no_grad():
            s.conv_out.weight.mul_(scale)
        slims.append(s)
    cfg = BuildConfig().replace(compress=BuildConfig().compress.replace(model="tiny"))
    profile = engine_profile(cfg, bundle)
    seq_len = int(bundle.encoder.encode([""])[0].shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        c = int(dense.config.in_channels)
        export_unet_onnx(dense, Path(tmp), sample_shape=(profile.opt_batch, c, profile.opt_height, profile.opt_width),
                         context_shape=(profile.opt_batch, seq_len, context_dim(dense)))
        engine = build_engine("onnxruntime", Path(tmp), engine_config(cfg, "cpu", profile, seq_len))
        calls = {"n": 0}
        real = parity.torch_eps

        def counted(unet, feeds):
            calls["n"] += unet is dense
            return real(unet, feeds)

        monkeypatch.setattr(parity, "torch_eps", counted)
        try:
            memo: dict = {}
            with_memo = [run_verify(cfg, bundle, {"dense": dense, "slim": s}, {"dense": engine, "slim": engine}, profile,
                                    dense_memo=memo) for s in slims]
            n_memo = calls["n"]
            calls["n"] = 0
            without = [run_verify(cfg, bundle, {"dense": dense, "slim": s}, {"dense": engine, "slim": engine}, profile)
                       for s in slims]
        finally:
            engine.close()
    assert n_memo * 2 == calls["n"] > 0  # the dense ε computed for the first slim UNet only
    for a, b in zip(with_memo, without, strict=True):
        # the same computation in one process; approx only so that no kernel-order detail can matter
        assert a["slim_vs_dense"]["eps_rel_error"] == pytest.approx(b["slim_vs_dense"]["eps_rel_error"], rel=1e-6)
        for k in ("cosine", "rel_error"):
            assert a["slim_vs_dense"]["trajectory"][k] == pytest.approx(b["slim_vs_dense"]["trajectory"][k], rel=1e-6)
        assert a["dense_export"]["passed"] == b["dense_export"]["passed"]
    assert with_memo[0]["slim_vs_dense"]["eps_rel_error_mean"] != with_memo[1]["slim_vs_dense"]["eps_rel_error_mean"]
