"""The latency table's validation (issue 18): predicted vs measured end-to-end latency of slim UNets on the engine.

For each backend (ONNX Runtime, OpenVINO by default), on one model (default SD1.4 shapes with random weights,
256×256 images = 32×32 latents, UNet batch 2, fp32):

1. the dense UNet is exported once; per backend the latency table is measured (``measure_table``, the dense
   export timed as its ``dense_ms``) and cached in ``WORK/latency-cache``;
2. one small calibration (``--calib-*``: 2 prompts × 2 steps × 2 bins at 256² by default) gives the statistics;
3. each variant (``--variants``; default: attn,ffn at 0.73 and 0.5 of the parameters with softmax and greedy, and
   latency budgets 0.8 and 0.7 with greedy) is planned (``plan_ranks``; latency variants per backend, on that
   backend's table), decomposed, exported, and timed against the dense engine in one process (``compare_speed``:
   interleaved ABBA, ``--iterations`` each);
4. the table's prediction (``predict_ms``: the table's dense time minus the modules' measured savings) is set
   beside the measured slim latency, and the predicted speed-up beside the measured one (drift between the table's
   measurement and the check cancels in the latter).

Results: ``--out`` (JSON, every figure and the environment) and a Markdown table on stdout and beside the JSON.

    python tools/latency_check.py                                         # SD1.4 shapes, both backends (about an hour on 2 cores)
    python tools/latency_check.py --model tiny --size 32 --iterations 5   # a smoke run (minutes)
    python tools/latency_check.py --repredict OLD.json --out NEW.json     # OLD's rows predicted again, nothing timed
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from slimexport.artifacts import sha256_json, write_json, write_text
from slimexport.errors import SlimExportError, UsageError

log = logging.getLogger("slimexport")

# name -> (targets, budget, method, metric): the five-plus slim UNets
DEFAULT_VARIANTS = "p73-softmax,p73-greedy,p50-softmax,p50-greedy,l80-greedy,l70-greedy"
METRICS = {"p": "params", "m": "macs", "l": "latency"}
GOAL = 0.10  # issue 18: predicted within ±10% of measured


def parse_variant(name: str, targets: tuple[str, ...]) -> dict:
    """``p73-softmax`` → params budget 0.73, softmax; ``l80-greedy`` → latency budget 0.80, greedy."""
    try:
        head, method = name.split("-")
        metric, budget = METRICS[head[0]], int(head[1:]) / 100
    except (ValueError, KeyError):
        raise UsageError(f"variant {name!r} is not <p|m|l><budget %>-<allocation>", "e.g. p73-softmax or l80-greedy") from None
    if method not in ("softmax", "greedy", "uniform") or not 0 < budget <= 1:
        raise UsageError(f"variant {name!r} has allocation {method!r} or budget {budget}", "e.g. p73-softmax or l80-greedy")
    return {"name": name, "targets": targets, "budget": budget, "method": method, "metric": metric}


def parse_args(argv=None, root: Path | None = None):
    root = Path.cwd() if root is None else Path(root)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    p = argparse.ArgumentParser(prog="latency_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd14")
    p.add_argument("--trained-weights", action="store_true", help="load the model's weights (default: random weights)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / VAE factor)")
    p.add_argument("--batch", type=int, default=1, help="prompts per call (UNet batch = 2 × this: CFG)")
    p.add_argument("--backends", default="onnxruntime,openvino")
    p.add_argument("--targets", default="attn,ffn")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated <p|m|l><budget %%>-<allocation>")
    p.add_argument("--calib-prompts", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=2)
    p.add_argument("--calib-bins", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10, help="timed calls per model per variant (interleaved)")
    p.add_argument("--copies", type=int, default=None, help="probe chain length (default measure's)")
    p.add_argument("--widths", type=int, default=None, help="ranks measured per group (default measure's)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per group (default measure's)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the cores this process may use)")
    p.add_argument("--work", type=Path, default=root / "engines" / "latency-check", help="exports, statistics, table cache")
    p.add_argument("--out", type=Path, default=root / "docs" / "results" / f"cpu-latency-check-{day}.json")
    p.add_argument("--keep-exports", action="store_true", help="keep the slim ONNX exports in WORK")
    p.add_argument("--repredict", type=Path, default=None, metavar="RESULTS",
                   help="time nothing: predict the rows of an earlier check's RESULTS.json again from the tables in WORK "
                        "(table-<backend>.json), as this code reads them (after a change to the table's arithmetic)")
    p.add_argument("--alignment", default="", help="also time fine rank steps: KIND:LEVEL:FIRST:STEP[,...] (e.g. "
                   "ff:1:2304:8 times the FFN of the second resolution level from width 2304 to its dense width in steps "
                   "of 8): which multiples the engine runs fast")
    return p.parse_args(argv)


def _profile(bundle, size: int, batch: int):
    from slimexport.engines.base import EngineProfile
    from slimexport.models.arch import latent_multiple

    step = bundle.vae_scale_factor * latent_multiple(bundle.unet)

    def snap(v: float) -> int:
        return max(step, int(round(v / step)) * step)

    hw = (snap(size / 2), snap(size), snap(size * 1.5))  # what a build's profile is around its size
    return EngineProfile.from_pixels(batch=(1, batch, max(batch, 4)), height=hw, width=hw,
                                     vae_scale_factor=bundle.vae_scale_factor, cfg=True,
                                     latent_multiple=latent_multiple(bundle.unet))


def _stats(bundle, args, work: Path):
    """Calibration statistics (kept in WORK/calib-<key> for reruns)."""
    from slimexport.calibrate import calibrate, select_prompts
    from slimexport.calibrate.stats import CalibStats
    from slimexport.config import CalibConfig

    cc = CalibConfig(num_prompts=args.calib_prompts, num_steps=args.calib_steps, num_bins=args.calib_bins,
                     batch_size=args.calib_prompts, height=args.size, width=args.size)
    folder = work / f"calib-{sha256_json([bundle.identity(), cc.to_dict()])[:16]}"
    if folder.is_dir():
        try:
            return CalibStats.load(folder)
        except SlimExportError as err:  # a stale or damaged folder: calibrate again
            log.warning("calibration in %s unreadable (%s); calibrating again", folder, err)
    prompts = select_prompts(bundle, cc, device="cpu", cache_dir=work / "embed")
    stats = calibrate(bundle, prompts, cc, progress=False)
    stats.save(folder)
    return stats


def alignment_sweep(unet, spec: str, backend: str, profile, probe: dict, threads, work: Path) -> dict:
    """One group timed at fine rank steps (``KIND:LEVEL:FIRST:STEP``: the first group of that kind whose resolution is
    the latent halved LEVEL times, from rank FIRST to the dense rank in steps of STEP)."""
    from dataclasses import replace

    from slimexport.latency.measure import measure_group, plan_groups
    from slimexport.models.kinds import KINDS

    try:
        kind, level, first, step = spec.split(":")
        level, first, step = int(level), int(first), int(step)
    except ValueError:
        raise UsageError(f"--alignment {spec!r} is not KIND:LEVEL:FIRST:STEP", "e.g. ff:1:2304:8") from None
    if kind not in KINDS:
        raise UsageError(f"--alignment kind {kind!r} is unknown", f"one of {', '.join(KINDS)}")
    plans = plan_groups(unet, (KINDS[kind].target,), profile.opt_height, profile.opt_width)
    plan = next((p for p in plans.values() if p.kind.name == kind and p.factor == 2 ** level), None)
    if plan is None:
        raise UsageError(f"--alignment: no {kind} group at level {level}", "pick a level the UNet has (0 = full resolution)")
    plan = replace(plan, widths=tuple(range(first, plan.max_rank, step)) + (plan.max_rank,))
    t0 = time.perf_counter()
    g = measure_group(unet, plan, backend, profile, threads=threads, copies=probe["copies"], rounds=probe["rounds"],
                      work_dir=work)
    return {"spec": spec, "backend": backend, "group": plan.gid, "widths": list(g.widths), "times_ms": list(g.times_ms),
            "spread_ms": list(g.spread_ms), "seconds": round(time.perf_counter() - t0, 1)}


def _row(variant: dict, backend: str, plan, table, speed: dict) -> dict:
    pred = table.predict_ms(plan["ranks"])
    dense, slim = speed["dense_ms"]["p50"], speed["slim_ms"]["p50"]
    pred_speedup = table.dense_ms / pred
    pred_same_run = dense - table.saved_ms(plan["ranks"])  # the table's savings from this run's dense time
    return {
        "variant": variant["name"], "backend": backend, "targets": list(variant["targets"]), "budget": variant["budget"],
        "metric": variant["metric"], "allocation": variant["method"],
        "params_kept": plan["params"]["slim_total"] / plan["params"]["dense_total"],
        "table_dense_ms": table.dense_ms, "predicted_ms": pred, "predicted_speedup": pred_speedup,
        "measured_dense_ms": dense, "measured_slim_ms": slim, "measured_speedup": speed["speedup"],
        "speedup_ci95": speed.get("speedup_ci95"),
        "error_ms_pct": 100 * (pred - slim) / slim,
        "error_speedup_pct": 100 * (pred_speedup - speed["speedup"]) / speed["speedup"],
        "predicted_same_run_ms": pred_same_run, "error_same_run_pct": 100 * (pred_same_run - slim) / slim,
        "iterations": speed["iterations"], "measured_slim_min_ms": speed["slim_ms"]["min"],
        "measured_dense_min_ms": speed["dense_ms"]["min"],
        "ranks": dict(plan["ranks"]),
    }


def summary(rows: list[dict]) -> dict:
    """The largest latency and speed-up errors of the rows, and how many are within the goal (±10%)."""
    errs, errs_ms = [abs(r["error_speedup_pct"]) for r in rows], [abs(r["error_ms_pct"]) for r in rows]
    return {"max_abs_error_ms_pct": max(errs_ms, default=None), "max_abs_error_speedup_pct": max(errs, default=None),
            "within_goal_ms": sum(e <= 100 * GOAL for e in errs_ms),
            "within_goal_speedup": sum(e <= 100 * GOAL for e in errs), "rows": len(rows)}


def markdown(rows: list[dict]) -> str:
    head = ("| backend | slim UNet | params kept | predicted ms | measured ms | error | predicted speed-up | "
            "measured speed-up (95% CI) | error |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        ci = r.get("speedup_ci95")
        ci_s = f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else ""
        what = f"{','.join(r['targets'])} {r['metric']} {r['budget']:g} {r['allocation']}"
        lines.append(f"| {r['backend']} | {what} | {r['params_kept']:.3f} | {r['predicted_ms']:.1f} | {r['measured_slim_ms']:.1f} "
                     f"| {r['error_ms_pct']:+.1f}% | {r['predicted_speedup']:.3f}× | {r['measured_speedup']:.3f}×{ci_s} "
                     f"| {r['error_speedup_pct']:+.1f}% |")
    return head + "\n".join(lines) + "\n"


def run(args) -> dict:
    import torch

    from slimexport.allocate.api import plan_ranks, reuses_curves
    from slimexport.bench.timing import compare_speed, environment
    from slimexport.config import AllocConfig, DecomposeConfig
    from slimexport.decompose.api import slim_unet
    from slimexport.decompose.methods import Factorisations
    from slimexport.engines.base import EngineConfig, build_engine, make_feeds
    from slimexport.engines.onnx_export import export_unet_onnx
    from slimexport.latency.measure import DEFAULT_COPIES, DEFAULT_ROUNDS, DEFAULT_WIDTHS, measure_table
    from slimexport.models import load_model

    t0 = time.perf_counter()
    targets = tuple(t for t in args.targets.split(",") if t)
    variants = [parse_variant(v, targets) for v in args.variants.split(",") if v]
    backends = [b for b in args.backends.split(",") if b]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bundle = load_model(args.model, random_weights=not args.trained_weights)
    unet = bundle.unet.to("cpu", torch.float32).eval()
    profile = _profile(bundle, args.size, args.batch)
    shape = (profile.opt_batch, int(unet.config.in_channels), profile.opt_height, profile.opt_width)
    log.info("latency check: %s, UNet batch %d, %dx%d latents, backends %s (%.0f s)", args.model, shape[0], shape[2], shape[3],
             backends, time.perf_counter() - t0)
    dense_dir = work / f"dense-{args.model}-{shape[0]}x{shape[2]}x{shape[3]}"
    if not (dense_dir / "export.json").exists():
        export_unet_onnx(unet, dense_dir, sample_shape=shape)
    log.info("dense export ready (%.0f s)", time.perf_counter() - t0)

    probe = dict(copies=args.copies or DEFAULT_COPIES, n_widths=args.widths or DEFAULT_WIDTHS,
                 rounds=args.rounds or DEFAULT_ROUNDS)
    tables, table_seconds = {}, {}
    for backend in backends:
        t1 = time.perf_counter()
        tables[backend] = measure_table(unet, targets, profile, backend, "fp32", cache_dir=work / "latency-cache",
                                        threads=args.threads, dense_onnx=dense_dir, work_dir=work / "probes", **probe)
        table_seconds[backend] = round(time.perf_counter() - t1, 1)
        tables[backend].save(work / f"table-{backend}.json")

    aligned = []
    for spec in (x for x in args.alignment.split(",") if x):
        for backend in backends:
            aligned.append(alignment_sweep(unet, spec, backend, profile, probe, args.threads, work / "probes"))
            log.info("alignment %s on %s: %s", spec, backend,
                     ", ".join(f"{w}: {t:.2f}" for w, t in zip(aligned[-1]["widths"], aligned[-1]["times_ms"])))

    stats = _stats(bundle, args, work) if variants else None
    log.info("statistics ready (%.0f s)", time.perf_counter() - t0)
    dcfg = DecomposeConfig()
    latent_hw = (profile.opt_height, profile.opt_width)
    slim_exports: dict[str, Path] = {}  # ranks digest -> export folder
    jobs = []  # (variant, backend, plan, export folder)
    unreachable = []
    for v in variants:
        acfg = AllocConfig(budget=v["budget"], targets=v["targets"], method=v["method"], metric=v["metric"])
        for_backends = backends if v["metric"] == "latency" else backends[:1]
        for backend in for_backends:
            # the greedy allocation's factorisations, reused by the decomposition (as compress does)
            factors = Factorisations() if v["method"] == "greedy" and reuses_curves(dcfg) else None
            try:
                plan = plan_ranks(unet, stats, dcfg, acfg, latent_hw=latent_hw, latency=tables[backend], factors=factors)
            except UsageError as err:  # a latency budget the targets cannot reach on this backend: said, not timed
                unreachable.append({"variant": v["name"], "backend": backend, "error": str(err)})
                log.warning("variant %s on %s: %s", v["name"], backend, err)
                continue
            digest = sha256_json(plan["ranks"])[:16]
            folder = work / f"slim-{digest}"
            write_json(work / "plans" / f"{v['name']}-{backend}.json", plan.to_dict())
            if digest not in slim_exports:  # the same ranks (a params variant on every backend) are exported once
                if not (folder / "export.json").exists():
                    slim, _ = slim_unet(unet, stats, plan, dcfg, device="cpu", progress=False, factors=factors)
                    export_unet_onnx(slim, folder, sample_shape=shape)
                    del slim
                    gc.collect()
                slim_exports[digest] = folder
            runs_on = [backend] if v["metric"] == "latency" else backends
            jobs += [(v, b, plan, folder) for b in runs_on]
            log.info("variant %s (%s): exported %s (%.0f s)", v["name"], backend if v["metric"] == "latency" else "all",
                     folder.name, time.perf_counter() - t0)
    del unet, bundle, stats
    gc.collect()

    rows = []
    for backend in backends:
        if not any(b == backend for _, b, _, _ in jobs):
            continue
        cfg = EngineConfig(device="cpu", threads=args.threads, profile=profile, dtype="fp32")
        dense = build_engine(backend, dense_dir, cfg)
        feeds = make_feeds(dense.io_spec, *[shape[i] for i in (0, 2, 3)], seed=0)
        try:
            for v, b, plan, folder in jobs:
                if b != backend:
                    continue
                slim = build_engine(backend, folder, cfg)
                try:
                    speed = compare_speed(dense, slim, feeds, warmup=2, iterations=args.iterations)
                finally:
                    slim.close()
                rows.append(_row(v, backend, plan, tables[backend], speed))
                r = rows[-1]
                log.info("%s %s: predicted %.1f ms (%.3fx), measured %.1f ms (%.3fx): %+.1f%% / %+.1f%% (%.0f s)", backend,
                         v["name"], r["predicted_ms"], r["predicted_speedup"], r["measured_slim_ms"], r["measured_speedup"],
                         r["error_ms_pct"], r["error_speedup_pct"], time.perf_counter() - t0)
        finally:
            dense.close()
    if not args.keep_exports:
        for folder in slim_exports.values():
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "format": "slimexport.latency-check/1", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python tools/latency_check.py " + " ".join(getattr(args, "argv", []) or []),
        "model": args.model, "random_weights": not args.trained_weights, "size": args.size,
        "unet_shape": list(shape), "backends": backends, "targets": list(targets),
        "calibration": {"prompts": args.calib_prompts, "steps": args.calib_steps, "bins": args.calib_bins},
        "probe": probe, "table_seconds": table_seconds,
        "tables": {b: {"dense_ms": t.dense_ms, "groups": len(t.groups), "digest": t.key.digest, "meta": t.meta}
                   for b, t in tables.items()},
        "rows": rows, "unreachable": unreachable, "alignment": aligned,
        "summary": summary(rows),
        "environment": environment("cpu"), "seconds": round(time.perf_counter() - t0, 1),
    }


def repredict(args) -> dict:
    """An earlier check's measured rows with this code's predictions from the tables it saved in WORK."""
    from slimexport.artifacts import read_json
    from slimexport.latency.table import LatencyTable

    old = read_json(args.repredict, "latency check results")
    tables = {b: LatencyTable.load(args.work / f"table-{b}.json") for b in sorted({r["backend"] for r in old["rows"]})}
    rows = []
    for r in old["rows"]:
        variant = {"name": r["variant"], "targets": r["targets"], "budget": r["budget"], "metric": r["metric"],
                   "method": r["allocation"]}
        plan = {"ranks": r["ranks"], "params": {"slim_total": r["params_kept"], "dense_total": 1.0}}
        speed = {"dense_ms": {"p50": r["measured_dense_ms"], "min": r["measured_dense_min_ms"]},
                 "slim_ms": {"p50": r["measured_slim_ms"], "min": r["measured_slim_min_ms"]},
                 "speedup": r["measured_speedup"], "speedup_ci95": r.get("speedup_ci95"), "iterations": r["iterations"]}
        rows.append(_row(variant, r["backend"], plan, tables[r["backend"]], speed))
    return {**old, "repredicted_from": str(args.repredict), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tables": {b: {"dense_ms": t.dense_ms, "groups": len(t.groups), "digest": t.key.digest, "scales": t.scales}
                       for b, t in tables.items()},
            "rows": rows, "summary": summary(rows)}


def main(argv=None, root: Path | None = None) -> int:
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, root)
    args.argv = argv
    res = repredict(args) if args.repredict is not None else run(args)
    write_json(args.out, res)
    md = markdown(res["rows"])
    write_text(args.out.with_suffix(".md"), md)
    print(md)
    print(json.dumps(res["summary"]))
    return 0
