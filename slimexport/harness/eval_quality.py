"""Quality harness (issue 4): SlimDiff against its baselines on the shipped ``digits`` model.

For the dense model and each (budget, method) row it compresses the UNet with :func:`slimexport.api.compress`
(one calibration shared through ``--cache``), then measures:

- ``eps``: mean relative ε error ``‖ε_slim − ε_dense‖ / ‖ε_dense‖`` over fixed timesteps, on real held-out
  digits noised with fixed noise (both CFG branches);
- ``final``: relative L2 error of the final sample of a fixed-seed DDIM trajectory (slim vs dense, same noise);
- on the rows picked by ``--sample-rows``: ``--samples`` generated digits (same seeds for every model), scored by
  :class:`slimexport.verify.quality.DigitsJudge` for conditional accuracy and Fréchet distance (FD) to the real
  held-out digits, each with its noise (bootstrap std of FD, binomial std of accuracy) and the *paired* noise of
  its difference to the dense row (same generated-sample and reference resamples for both models).

Rows are written to ``OUT/results.json`` as they finish; a rerun reuses every row whose settings are unchanged
(so ``--sample-rows`` can be widened in a second pass). ``--report-only`` rewrites ``results.md`` and the plot.

    python tools/eval_quality.py                           # everything, default settings
    python tools/eval_quality.py --sample-rows target      # FD / accuracy on the dense and budget-0.73 rows only

The ε error, the sampler and the final-sample error are :mod:`slimexport.verify.quality`'s (one formula,
:func:`slimexport.verify.metrics.relative_l2`); this module adds the rows, the paired judge scores and the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

from slimexport.config import AllocConfig, CalibConfig, CompressConfig, DecomposeConfig
from slimexport.errors import UsageError
from slimexport.verify.metrics import relative_l2
from slimexport.verify.quality import eps_errors, frechet_distance, reference_eps, sample_trajectory

MAIN_BUDGETS = (0.9, 0.8, 0.73, 0.6, 0.5)
TARGET_BUDGET = 0.73
EPS_TIMESTEPS = (999, 750, 500, 250, 50)
# method id -> (label, DecomposeConfig overrides, AllocConfig overrides)
METHODS = {
    "slimdiff": ("SlimDiff (spectral, CPQR, whiten-SVD, softmax τ=1)", {}, {}),
    "uniform_alloc": ("uniform allocation", {}, {"method": "uniform"}),
    "plain_svd": ("uniform plain-SVD (no activations)", {"qkvo_method": "weight", "ffn_selection": "weight"}, {"method": "uniform"}),
    "uniform_t": ("uniform timestep weighting", {"timestep_weighting": "uniform"}, {}),
    "random": ("random selection, uniform allocation", {"qkvo_method": "random", "ffn_selection": "random"}, {"method": "uniform"}),
    "greedy": ("error-aware greedy allocation (beyond the paper)", {}, {"method": "greedy"}),
}
CALIB_SIZES = (16, 64, 256, "all")
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, math.inf)


def parse_args(argv=None, root: Path | None = None):
    """The harness's options; ``root``: the folder the default ``--out`` (docs/quality) and ``--work``
    (engines/quality) are under (the repository, for tools/eval_quality.py; default the current folder)."""
    root = Path.cwd() if root is None else Path(root)
    p = argparse.ArgumentParser(prog="eval_quality.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=root / "docs" / "quality", help="results folder (default docs/quality)")
    p.add_argument("--work", type=Path, default=root / "engines" / "quality", help="compressed models and the calibration cache")
    p.add_argument("--budgets", default=",".join(map(str, MAIN_BUDGETS)), help="main-table budgets (fractions of attn+ffn params)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"main-table methods, of {','.join(METHODS)}")
    p.add_argument("--groups", default="main,calib,temperature,targets,resnet",
                   help="row groups besides the dense row: main,calib,temperature,targets,resnet")
    p.add_argument("--sample-rows", default="target", choices=("none", "target", "main", "all"),
                   help="rows scored by the judge: target = dense + main rows at 0.73; main = + all main rows; all")
    p.add_argument("--samples", type=int, default=200, help="generated digits per scored row (a multiple of 10)")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the generated samples")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the generated samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (batch b uses seed + b)")
    p.add_argument("--batch", type=int, default=100, help="samples per sampling batch")
    p.add_argument("--boot", type=int, default=100, help="bootstrap resamples for the FD noise")
    p.add_argument("--traj", type=int, default=10, help="labels in the fixed-seed trajectory (final-sample error)")
    p.add_argument("--calib-prompts", type=int, default=64, help="SlimSet size of the shared calibration")
    p.add_argument("--calib-steps", type=int, default=10, help="DDIM steps of the calibration")
    p.add_argument("--calib-bins", type=int, default=5, help="timestep bins of the calibration")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 was fastest on the shared 2-core machine)")
    p.add_argument("--merge", type=Path, action="append", default=[],
                   help="also reuse the rows of this results.json (same settings), e.g. from a parallel run")
    p.add_argument("--only", default="", help="comma-separated row ids to run (the dense row always runs), e.g. proj@0.73")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# rows


def calib_cfg(args, num_prompts=None) -> CalibConfig:
    return CalibConfig(num_prompts=num_prompts or args.calib_prompts, num_steps=args.calib_steps, num_bins=args.calib_bins)


def make_rows(args, pool_size: int) -> list[dict]:
    """Every row as ``{"id", "group", "method", "label", "budget", "compress": CompressConfig or None}``."""
    budgets = [float(b) for b in args.budgets.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    groups = set(args.groups.split(","))
    base = CompressConfig(model="digits", device="cpu", calib=calib_cfg(args))
    rows = [{"id": "dense", "group": "dense", "method": "dense", "label": "dense", "budget": 1.0, "compress": None}]

    def cfg(budget, dec=None, alloc=None, calib=None):
        return base.replace(calib=calib or base.calib, decompose=DecomposeConfig(**(dec or {})),
                            alloc=AllocConfig(budget=budget, **(alloc or {})))

    if "main" in groups:
        order = sorted(budgets, key=lambda b: (b != TARGET_BUDGET, -b))  # the target budget first
        for b in order:
            for m in methods:
                label, dec, alloc = METHODS[m]
                rows.append({"id": f"{m}@{b:g}", "group": "main", "method": m, "label": label, "budget": b,
                             "compress": cfg(b, dec, alloc)})
    if "calib" in groups:
        for n in CALIB_SIZES:
            k = pool_size if n == "all" else n
            rows.append({"id": f"calib{n}@0.73", "group": "calib", "method": "slimdiff", "label": f"SlimDiff, {k} calibration prompts",
                         "budget": TARGET_BUDGET, "calib_prompts": k, "compress": cfg(TARGET_BUDGET, calib=calib_cfg(args, k))})
    if "temperature" in groups:
        for t in TEMPERATURES:
            rows.append({"id": f"tau{t:g}@0.73", "group": "temperature", "method": "slimdiff", "label": f"SlimDiff, τ={t:g}",
                         "budget": TARGET_BUDGET, "temperature": "inf" if math.isinf(t) else t,
                         "compress": cfg(TARGET_BUDGET, alloc={"temperature": t})})
    if "targets" in groups:
        for t in (("attn",), ("ffn",)):
            rows.append({"id": f"{t[0]}-only@0.73", "group": "targets", "method": "slimdiff", "label": f"SlimDiff, {t[0]} only",
                         "budget": TARGET_BUDGET, "compress": cfg(TARGET_BUDGET, alloc={"targets": t})})
        rows.append({"id": "proj@0.73", "group": "targets", "method": "proj", "label": "SlimDiff, attn+ffn+proj (factored proj_in/out)",
                     "budget": TARGET_BUDGET, "compress": cfg(TARGET_BUDGET, alloc={"targets": ("attn", "ffn", "proj")})})
    if "resnet" in groups:
        for b in budgets:  # whole-UNet budget matched to SlimDiff's attn+ffn row at b (filled in when that row is done)
            rows.append({"id": f"resnet-matched@{b:g}", "group": "resnet", "method": "resnet", "label": "attn+ffn+resnet, whole-UNet budget",
                         "budget": None, "match": f"slimdiff@{b:g}", "compress": None})
        rows.append({"id": "resnet-unet@0.73", "group": "resnet", "method": "resnet_aggressive", "label": "attn+ffn+resnet, whole UNet 0.73",
                     "budget": TARGET_BUDGET, "compress": cfg(TARGET_BUDGET, alloc={"targets": ("attn", "ffn", "resnet"), "scope": "unet"})})
        for b in (TARGET_BUDGET, 0.6):  # the MAC-budget variants timed on SD1.4 (docs/benchmarks.md)
            rows.append({"id": f"resnet-macs@{b:g}", "group": "resnet", "method": "resnet_macs",
                         "label": f"attn+ffn+resnet, whole-UNet MAC budget {b:g}", "budget": b,
                         "compress": cfg(b, alloc={"targets": ("attn", "ffn", "resnet"), "scope": "unet", "metric": "macs"})})
        for metric in ("params", "macs"):  # the same two cuts with the error-aware allocation
            rows.append({"id": f"resnet-greedy-{metric}@0.73", "group": "resnet", "method": "resnet_greedy",
                         "label": f"attn+ffn+resnet, whole-UNet {'MAC' if metric == 'macs' else 'parameter'} budget 0.73, greedy allocation",
                         "budget": TARGET_BUDGET, "compress": cfg(TARGET_BUDGET, alloc={
                             "targets": ("attn", "ffn", "resnet"), "scope": "unet", "metric": metric, "method": "greedy"})})
    return rows


def wants_samples(row: dict, mode: str) -> bool:
    if mode == "none":
        return False
    if mode == "all" or row["group"] == "dense":
        return True
    if row["group"] != "main":
        return False
    return mode == "main" or abs(row["budget"] - TARGET_BUDGET) < 1e-9


# ---------------------------------------------------------------------------------------------------------------
# metrics


def fixed_eps_inputs(bundle, judge) -> list[tuple]:
    """Real held-out digits (1 per class) noised at each timestep with fixed noise; both CFG branches.

    Returns :func:`slimexport.verify.quality.reference_eps` of the dense UNet: ``[(t, x_t, context, ε_dense)]``
    (the dense prediction computed once)."""
    labels = judge.test_labels
    idx = torch.cat([torch.nonzero(labels == d).flatten()[:1] for d in range(10)])
    x0, lab = judge.test_images[idx], labels[idx]
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(x0.shape, generator=g)
    sched = bundle.make_scheduler()
    with torch.no_grad():
        cond = bundle.encoder.encode_labels(lab)
        uncond, _ = bundle.encoder.encode([""] * len(lab))
    ctx = torch.cat([uncond, cond])
    inputs = [(t, torch.cat([sched.add_noise(x0, noise, torch.full((len(x0),), t, dtype=torch.long))] * 2), ctx)
              for t in EPS_TIMESTEPS]
    return reference_eps(bundle.unet, inputs)


def generate(unet, bundle, args) -> tuple[torch.Tensor, torch.Tensor]:
    """``args.samples`` digits (equal numbers of each class), the same seeds for every model."""
    labels = torch.arange(10).repeat(args.samples // 10)
    outs = []
    for b, start in enumerate(range(0, len(labels), args.batch)):
        outs.append(sample_trajectory(unet, bundle, labels[start:start + args.batch], seed=args.seed + b,
                                      steps=args.sample_steps, guidance=args.guidance))
    return torch.cat(outs).float(), labels


def judge_scores(judge, images, labels, dense_cache=None, boot=100) -> dict:
    """Accuracy and FD with their noise, and (given the dense row's features) paired differences to dense."""
    correct = (judge.predict(images) == labels).double()
    feats = judge.features(images)
    ref = judge.ref_features
    n = len(correct)
    acc = float(correct.mean())
    out = {"n_samples": n, "accuracy": acc, "accuracy_std": math.sqrt(max(acc * (1 - acc), 1e-12) / n),
           "fd": frechet_distance(feats, ref)}
    g = torch.Generator().manual_seed(0)
    fds, dfd, dacc = [], [], []
    for _ in range(boot):
        ia, ib = torch.randint(n, (n,), generator=g), torch.randint(len(ref), (len(ref),), generator=g)
        fds.append(frechet_distance(feats[ia], ref[ib]))
        if dense_cache is not None:
            dfd.append(fds[-1] - frechet_distance(dense_cache["feats"][ia], ref[ib]))
            dacc.append(float(correct[ia].mean() - dense_cache["correct"][ia].mean()))
    out["fd_std"] = float(torch.tensor(fds).std())
    if dense_cache is not None:
        out["fd_delta"] = out["fd"] - dense_cache["fd"]
        out["fd_delta_std"] = float(torch.tensor(dfd).std())
        out["accuracy_delta"] = acc - float(dense_cache["correct"].mean())
        out["accuracy_delta_std"] = float(torch.tensor(dacc).std())
    return out, {"feats": feats, "correct": correct, "fd": out["fd"]}


def trajectory_labels(args) -> torch.Tensor:
    return torch.arange(10).repeat(max(1, args.traj // 10))


def final_error(dense_final, unet, bundle, args) -> float:
    """Relative L2 error of the final samples of the fixed-seed trajectory (seed 10 000) against the dense ones."""
    x = sample_trajectory(unet, bundle, trajectory_labels(args), seed=10_000, steps=args.sample_steps,
                          guidance=args.guidance).float()
    return relative_l2(x, dense_final)


# ---------------------------------------------------------------------------------------------------------------
# run


def settings(args) -> dict:
    return {"samples": args.samples, "sample_steps": args.sample_steps, "guidance": args.guidance, "seed": args.seed,
            "boot": args.boot, "traj": args.traj, "eps_timesteps": list(EPS_TIMESTEPS),
            "calib": {"num_prompts": args.calib_prompts, "num_steps": args.calib_steps, "num_bins": args.calib_bins}}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}


def run(args, command: str = "") -> dict:
    """Compress and score every row (reusing finished rows of ``args.out``/results.json); returns the results.

    ``command``: the command line recorded in the results."""
    from slimexport.api import compress
    from slimexport.artifacts import write_json
    from slimexport.models import load_model
    from slimexport.verify.quality import DigitsJudge

    log = logging.getLogger("eval_quality")
    res_path = args.out / "results.json"
    old = json.loads(res_path.read_text()) if res_path.exists() else {}
    same = old.get("settings") == settings(args)
    old_rows = {r["id"]: r for r in old.get("rows", [])} if same else {}
    for extra in args.merge:
        other = json.loads(Path(extra).read_text())
        if other.get("settings") == settings(args):
            old_rows.update({r["id"]: r for r in other["rows"] if r["id"] not in old_rows})
    bundle = load_model("digits")
    dense = bundle.unet.eval()
    rows = make_rows(args, len(bundle.prompt_pool))
    if args.only:
        keep = set(args.only.split(","))
        rows = [r for r in rows if r["id"] == "dense" or r["id"] in keep]
    t0 = time.perf_counter()
    judge = DigitsJudge.fit()
    log.info("judge fitted in %.0f s (test accuracy %.4f)", time.perf_counter() - t0, judge.test_accuracy)
    eps_inputs = fixed_eps_inputs(bundle, judge)
    dense_final = sample_trajectory(dense, bundle, trajectory_labels(args), seed=10_000, steps=args.sample_steps,
                                    guidance=args.guidance).float()
    dense_total = sum(p.numel() for p in dense.parameters())
    results = {"command": command, "settings": settings(args),
               "machine": machine(), "date": time.strftime("%Y-%m-%d"), "judge_test_accuracy": judge.test_accuracy,
               "rows": []}
    if same and "started" in old:
        results["started"] = old["started"]
    else:
        results["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done: dict[str, dict] = {}
    dense_cache = None
    for row in rows:
        spec = {k: v for k, v in row.items() if k != "compress"}
        if row["id"].startswith("resnet-matched"):
            ref = done.get(row["match"])
            if ref is None:
                log.warning("skipping %s: %s has not run", row["id"], row["match"])
                continue
            b = ref["params_total"] / dense_total
            spec["budget"] = round(b, 6)
            row["compress"] = CompressConfig(model="digits", device="cpu", calib=calib_cfg(args)).replace(
                alloc=AllocConfig(budget=round(b, 6), targets=("attn", "ffn", "resnet"), scope="unet"))
        need_samples = wants_samples(row, args.sample_rows)
        prev = old_rows.get(row["id"])
        cfg_dict = row["compress"].to_dict() if row["compress"] is not None else None
        reuse = prev is not None and prev.get("config") == cfg_dict and (not need_samples or "fd" in prev)
        if reuse and not (row["id"] == "dense" and need_samples):  # the dense samples are re-read for the paired noise
            done[row["id"]] = prev
            results["rows"].append(prev)
            log.info("%-22s reused", row["id"])
            continue
        t = time.perf_counter()
        rec = dict(spec, config=cfg_dict)
        if row["compress"] is None:
            unet = dense
            rec.update(params_targeted_dense=None, params_targeted=None, params_total=dense_total, eps_rel_error=0.0,
                       eps_by_t={str(k): 0.0 for k in EPS_TIMESTEPS}, final_rel_l2=0.0)
        else:
            res = compress(row["compress"], out=args.work / row["id"].replace("@", "_b"), bundle=bundle,
                           cache_dir=args.work / ".cache", progress=False)
            unet = res.load_slim().eval()
            p = res.plan["params"]
            by_t = eps_errors(unet, eps_inputs)
            rec.update(params_targeted_dense=p["targeted_dense"], params_targeted=p["targeted_slim"], params_total=p["slim_total"],
                       targeted_fraction=p["targeted_slim"] / p["targeted_dense"], unet_fraction=p["slim_total"] / dense_total,
                       eps_by_t={str(k): v for k, v in by_t.items()}, eps_rel_error=sum(by_t.values()) / len(by_t),
                       final_rel_l2=final_error(dense_final, unet, bundle, args),
                       compress_seconds={k: round(v.seconds, 1) for k, v in res.stages.items()})
        if need_samples:
            if row["id"] != "dense" and dense_cache is None:
                raise RuntimeError("the dense row must be scored before any other")
            cache_file = args.work / "samples" / f"{row['id']}.pt"
            key = {"settings": settings(args), "config": cfg_dict}
            saved = torch.load(cache_file) if cache_file.exists() else None
            if saved is not None and saved["key"] == key:
                images, labels = saved["images"], saved["labels"]
            else:
                images, labels = generate(unet, bundle, args)
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"key": key, "images": images, "labels": labels}, cache_file)
            scores, cache = judge_scores(judge, images, labels, None if row["id"] == "dense" else dense_cache, args.boot)
            rec.update(scores)
            if row["id"] == "dense":
                dense_cache = cache
        rec["seconds"] = round(time.perf_counter() - t, 1)
        log.info("%-22s params %9d  eps %.4f  final %.4f%s  (%.0f s)", row["id"], rec["params_total"], rec["eps_rel_error"],
                 rec["final_rel_l2"], f"  FD {rec['fd']:.2f}±{rec['fd_std']:.2f} acc {rec['accuracy']:.3f}" if "fd" in rec else "",
                 rec["seconds"])
        done[row["id"]] = rec
        results["rows"].append(rec)
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(res_path, results)
    write_json(res_path, results)
    return results


# ---------------------------------------------------------------------------------------------------------------
# report


def _pm(v, s, fmt="{:.1f}"):
    if v is None:
        return "–"
    return (fmt + " ± " + fmt.replace("+", "")).format(v, s) if s is not None and not math.isnan(s) else fmt.format(v)


def _row_md(r: dict, dense: dict | None) -> str:
    fd = _pm(r.get("fd"), r.get("fd_std"))
    acc = _pm(100 * r["accuracy"], 100 * r["accuracy_std"]) if "accuracy" in r else "–"
    dfd = _pm(r.get("fd_delta"), r.get("fd_delta_std"), "{:+.1f}") if "fd_delta" in r else "–"
    dacc = _pm(100 * r["accuracy_delta"], 100 * r["accuracy_delta_std"], "{:+.1f}") if "accuracy_delta" in r else "–"
    tgt = "–" if r.get("params_targeted") is None else f"{r['params_targeted']:,} ({r['targeted_fraction']:.3f})"
    tot = f"{r['params_total']:,}" + ("" if dense is None or r["id"] == "dense" else f" ({r['params_total'] / dense['params_total']:.3f})")
    return (f"| {r['label']} | {r['budget']:.3g} | {tgt} | {tot} | {fd} | {dfd} | {acc} | {dacc} | "
            f"{r['eps_rel_error']:.4f} | {r['final_rel_l2']:.4f} |")


HEADER = ("| method | budget | targeted params (kept) | total params | FD ↓ | ΔFD vs dense (paired) | accuracy % ↑ | "
          "Δacc vs dense (paired) | mean ε rel. error ↓ | final-sample rel. error ↓ |\n|---|---|---|---|---|---|---|---|---|---|")


def target_check(rows: dict) -> dict:
    d, s = rows.get("dense"), rows.get(f"slimdiff@{TARGET_BUDGET:g}")
    if not d or not s or "fd" not in s or "fd" not in d:
        return {"evaluated": False}
    base = [rows[f"{m}@{TARGET_BUDGET:g}"] for m in METHODS if m not in ("slimdiff", "greedy") and f"{m}@{TARGET_BUDGET:g}" in rows]
    out = {"evaluated": True, "fd_ratio": s["fd"] / d["fd"], "fd_within_10pct": s["fd"] <= 1.1 * d["fd"],
           "accuracy_drop_points": 100 * (d["accuracy"] - s["accuracy"]),
           "accuracy_within_2pts": 100 * (d["accuracy"] - s["accuracy"]) <= 2.0,
           "beats_baselines_fd": {b["method"]: s["fd"] < b["fd"] for b in base if "fd" in b},
           "beats_baselines_eps": {b["method"]: s["eps_rel_error"] < b["eps_rel_error"] for b in base}}
    out["met"] = (out["fd_within_10pct"] and out["accuracy_within_2pts"] and all(out["beats_baselines_fd"].values())
                  and all(out["beats_baselines_eps"].values()) and len(out["beats_baselines_fd"]) == len(base))
    return out


COMMANDS = "## Commands of the recorded run"


def write_report(results: dict, out: Path) -> None:
    rows = {r["id"]: r for r in results["rows"]}
    dense = rows.get("dense")
    results["target"] = target_check(rows)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "quality_vs_params.png")
    st = results["settings"]
    lines = ["# Quality harness: SlimDiff vs baselines on `digits` (issue 4)", "",
             f"Produced by `{results['command']}` on {results['date']} "
             f"({results['machine']['processor']}, {results['machine']['cpus']} CPU cores shared with other jobs, torch "
             f"{results['machine']['torch']}, {results['machine']['torch_threads']} threads). Raw numbers: `results.json`; "
             "plot: `quality_vs_params.png`.", "",
             "## Protocol", "",
             f"- Model: the shipped `digits` UNet ({dense['params_total']:,} parameters), fp32 on the CPU." if dense else "",
             f"- Calibration (shared by every row but the calibration-size ablation): {st['calib']['num_prompts']} SlimSet prompts × "
             f"{st['calib']['num_steps']} DDIM steps, {st['calib']['num_bins']} timestep bins, CFG 7.5 (library default guidance). "
             "The library's default calibration (the whole 400-prompt pool × 25 steps) is the `all` row of the calibration-size "
             "ablation only in prompt count; its steps were cut to fit the CPU budget.",
             "- Budget: fraction of the *targeted* (attention + FFN) parameters kept, as in the paper; every method of a "
             "budget has the same parameter count up to one rank step (see the columns).",
             f"- FD / accuracy: {st['samples']} generated digits per scored row ({st['samples'] // 10} of each class), DDIM "
             f"{st['sample_steps']} steps, η 0, CFG {st['guidance']}, the *same* initial noise for every model; scored by "
             f"`DigitsJudge` (held-out test accuracy {results['judge_test_accuracy']:.3f}). FD is to the real held-out test "
             f"digits in the judge's 64-d features. Noise: FD ± bootstrap std ({st['boot']} resamples of both sets), accuracy ± "
             "binomial std. The Δ columns are differences to the dense row with their *paired* noise (the same resampled "
             "indices for both models), which is what supports a comparison between rows.",
             f"- ε error: ‖ε_slim − ε_dense‖ / ‖ε_dense‖ on 10 real held-out digits (1 per class) noised with fixed noise at "
             f"t ∈ {st['eps_timesteps']}, both CFG branches, averaged over t.",
             f"- Final-sample error: relative L2 distance of the final images of a fixed-seed trajectory ({st['traj']} labels, "
             f"same sampler) from the dense model's.", ""]
    tc = results["target"]
    lines += ["## Target (issue 4)", "",
              f"At budget {TARGET_BUDGET}: SlimDiff's FD within 10 % of the dense model's, accuracy within 2 points, and better "
              "than every baseline on FD and on ε error.", ""]
    if tc.get("evaluated"):
        s = rows[f"slimdiff@{TARGET_BUDGET:g}"]
        lines += [f"- FD: dense {dense['fd']:.1f} ± {dense['fd_std']:.1f}, SlimDiff {s['fd']:.1f} ± {s['fd_std']:.1f} "
                  f"(ratio {tc['fd_ratio']:.3f}; paired Δ {s['fd_delta']:+.1f} ± {s['fd_delta_std']:.1f}): "
                  f"{'within' if tc['fd_within_10pct'] else 'NOT within'} 10 %.",
                  f"- Accuracy: dense {100 * dense['accuracy']:.1f} %, SlimDiff {100 * s['accuracy']:.1f} % (drop "
                  f"{tc['accuracy_drop_points']:.1f} points; paired Δ {100 * s['accuracy_delta']:+.1f} ± "
                  f"{100 * s['accuracy_delta_std']:.1f}): {'within' if tc['accuracy_within_2pts'] else 'NOT within'} 2 points.",
                  "- Better FD than: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in tc["beats_baselines_fd"].items()) + ".",
                  "- Better ε error than: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in tc["beats_baselines_eps"].items()) + ".",
                  f"- **Target {'met' if tc['met'] else 'NOT met'}** (point estimates; see the noise columns and the reading below).", ""]
    else:
        lines += ["- Not evaluated (the dense or SlimDiff 0.73 row was not scored).", ""]
    groups = [("main", "Budgets × methods"), ("calib", "Ablation at 0.73: calibration set size"),
              ("temperature", "Ablation at 0.73: allocation temperature τ"),
              ("targets", "Ablation at 0.73: attention-only vs FFN-only (the library has no QK-only or VO-only target: "
                          "`targets` takes attn, ffn, resnet, proj; attn always compresses QK and VO together), and attn+ffn+proj"),
              ("resnet", "Issue 6: ResNet inner channels too (`targets=attn,ffn,resnet`, `scope=unet`); matched rows use "
                         "SlimDiff's whole-UNet fraction slim_total / dense_total at the same attn+ffn budget, so 'budget' is a "
                         "whole-UNet fraction here")]
    for g, title in groups:
        rs = [r for r in results["rows"] if r["group"] == g]
        if not rs:
            continue
        lines += [f"## {title}", "", HEADER]
        if dense:
            lines.append(_row_md(dense, dense))
        lines += [_row_md(r, dense) for r in rs]
        lines.append("")
    lines += ["## Compact table (budgets × methods)", "", compact_table(results), ""]
    lines += ["## Reading", "", "READING_PLACEHOLDER", ""]
    md = out / "results.md"
    old = md.read_text() if md.exists() else ""
    text = "\n".join(lines)
    if "## Reading" in old and "READING_PLACEHOLDER" not in old:  # keep a hand-written reading across reruns
        text = text.split("## Reading", 1)[0] + "## Reading" + old.split("## Reading", 1)[1]
    if COMMANDS in old:  # and the hand-written list of the commands that produced the rows
        commands = old[old.index(COMMANDS):old.index("## Protocol")]
        text = text.replace("## Protocol", commands + "## Protocol", 1)
    md.write_text(text)


def compact_table(results: dict) -> str:
    """Budgets × methods: mean ε relative error, with FD and accuracy where the row was scored (README table)."""
    rows = {r["id"]: r for r in results["rows"]}
    budgets = sorted({r["budget"] for r in results["rows"] if r["group"] == "main"}, reverse=True)
    head = "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |\n|---|" + "---|" * len(budgets)
    lines = [head]
    d = rows.get("dense")
    if d:
        cell = "ε 0" + (f", FD {d['fd']:.1f} ± {d['fd_std']:.1f}, acc {100 * d['accuracy']:.1f} %" if "fd" in d else "")
        lines.append(f"| dense ({d['params_total'] / 1e6:.2f} M params) | {cell} (budget 1) |" + " |" * (len(budgets) - 1))
    for m, (label, _, _) in METHODS.items():
        cells = []
        for b in budgets:
            r = rows.get(f"{m}@{b:g}")
            if r is None:
                cells.append("–")
                continue
            c = f"ε {r['eps_rel_error']:.4f}"
            if "fd" in r:
                c += f", FD {r['fd']:.1f} ± {r['fd_std']:.1f}, acc {100 * r['accuracy']:.1f} %"
            cells.append(c)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    params = [rows.get(f"slimdiff@{b:g}") for b in budgets]
    lines.append("| (SlimDiff total params, M) | " + " | ".join(f"{r['params_total'] / 1e6:.2f}" if r else "–" for r in params) + " |")
    return "\n".join(lines)


SHORT = {"slimdiff": "SlimDiff", "uniform_alloc": "uniform alloc.", "plain_svd": "uniform plain-SVD", "uniform_t": "uniform-t weighting",
         "random": "random", "resnet": "+resnet (matched)", "resnet_aggressive": "+resnet (UNet 0.73)", "resnet_macs": "+resnet (MAC budget)", "resnet_greedy": "+resnet (greedy)", "greedy": "greedy alloc.",
         "proj": "+proj", "dense": "dense"}


def plot(results: dict, path: Path) -> None:
    """ε error and final-sample error against total parameters (one line per method, every budget), and FD and
    accuracy of the judge-scored rows (the dense model and the budget-0.73 rows) with 1-std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    dense = next((r for r in rows if r["id"] == "dense"), None)
    series = [(m, METHODS[m][0]) for m in METHODS] + [("resnet", "attn+ffn+resnet, whole-UNet budget matched to SlimDiff"),
                                                      ("resnet_aggressive", "attn+ffn+resnet, whole UNet 0.73")]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    for ax, key, title in ((axes[0, 0], "eps_rel_error", "mean ε relative error vs dense ↓"),
                           (axes[0, 1], "final_rel_l2", "final-sample relative error vs dense ↓")):
        for i, (m, label) in enumerate(series):
            pts = sorted((r for r in rows if r["method"] == m and r["group"] in ("main", "resnet")), key=lambda r: r["params_total"])
            if pts:
                ax.plot([r["params_total"] / 1e6 for r in pts], [r[key] for r in pts], marker="o", ms=5, color=f"C{i}",
                        label=label + (" (thick: uniform-t lies on it)" if m == "slimdiff" else ""), lw=5 if m == "slimdiff" else 1.5,
                        alpha=0.5 if m == "slimdiff" else 1.0)
        ax.set_xlabel("UNet parameters (M); dense = %.2f M" % (dense["params_total"] / 1e6) if dense else "UNet parameters (M)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.ticklabel_format(axis="x", useOffset=False)
    axes[0, 0].legend(fontsize=8)
    scored = [r for r in rows if "fd" in r]
    names = [SHORT.get(r["method"], r["method"]) + ("" if r["id"] == "dense" else f"\n{r['params_total'] / 1e6:.2f} M") for r in scored]
    for ax, key, err, scale, title in ((axes[1, 0], "fd", "fd_std", 1, "Fréchet distance to real digits ↓"),
                                       (axes[1, 1], "accuracy", "accuracy_std", 100, "conditional accuracy % ↑")):
        x = range(len(scored))
        order = [m for m, _ in series]
        colors = ["k" if r["id"] == "dense" else f"C{order.index(r['method'])}" if r["method"] in order else "C9" for r in scored]
        ax.bar(x, [scale * r[key] for r in scored], yerr=[scale * r[err] for r in scored], capsize=4, color=colors, alpha=0.8)
        ax.set_xticks(list(x), names, fontsize=8, rotation=20)
        if dense and key in dense:
            ax.axhline(scale * dense[key], color="k", ls="--", lw=1)
        ax.set_title(title + f" (budget {TARGET_BUDGET}, {results['settings']['samples']} samples)")
        ax.grid(alpha=0.3, axis="y")
        if key == "accuracy" and scored:
            lo = min(scale * (r[key] - 3 * r[err]) for r in scored)
            ax.set_ylim(max(0, lo - 2), 100.5)
            ax.ticklabel_format(axis="y", useOffset=False)
    fig.suptitle("digits UNet: SlimDiff vs baselines (attn+ffn budgets {}; error bars = 1 std)".format(", ".join(str(b) for b in MAIN_BUDGETS)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None, root: Path | None = None, command: str = "python tools/eval_quality.py") -> int:
    """The command line (``tools/eval_quality.py``); ``root`` as in :func:`parse_args`."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, root)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("slimexport").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        have = {r["id"] for r in results["rows"]}
        for extra in args.merge:  # rows of parallel runs with the same settings, in the canonical row order
            other = json.loads(Path(extra).read_text())
            if other.get("settings") != results["settings"]:
                raise UsageError(f"--merge {extra}: other settings than {args.out / 'results.json'}",
                                 "merge results of runs with the same settings")
            results["rows"] += [r for r in other["rows"] if r["id"] not in have]
            have |= {r["id"] for r in other["rows"]}
        order = {r["id"]: i for i, r in enumerate(make_rows(parse_args(["--groups", "main,calib,temperature,targets,resnet"], root), 400))}
        results["rows"].sort(key=lambda r: (r["group"] != "dense", r["group"] != "main", -(r["budget"] or 0) if r["group"] == "main" else 0,
                                            order.get(r["id"], len(order))))
    else:
        if args.samples % 10 or args.samples < 20:
            raise UsageError(f"--samples {args.samples} is invalid", "use a multiple of 10, at least 20")
        t = time.perf_counter()
        results = run(args, " ".join([command, *argv]))
        results["runtime_seconds"] = round(time.perf_counter() - t, 1)
    write_report(results, args.out)
    print(json.dumps({"rows": len(results["rows"]), "target": results.get("target")}, indent=1))
    return 0

