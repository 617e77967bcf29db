"""``slimexport sweep``: the speed–quality frontier of one model on one engine.

One load, one calibration (shared by every point through the calibration cache: only the allocation changes), one
dense ONNX export and one dense engine; then for each grid point (budget × target set × allocation) the build's own
stages: compress → slim ONNX export → slim engine → verify (ε error, final-latent cosine and final-sample error of
a fixed-seed trajectory, the default gate) → bench (dense vs slim on the engine, interleaved, with a 95% interval);
on ``digits`` also the judge's accuracy and Fréchet distance of generated samples. With ``--cache``, step caching
(as ``build --cache``): the dense UNet's full/shallow pair once (``dense/``), each point's slim pair, and per point
the pair parity, the cached trajectories' fidelity and whole-loop per-image timing of dense, slim, cached and
cached + slim: ``frontier.*`` gain a per-image section with its own Pareto front.

Layout of ``DIR``: ``manifest.json`` (the sweep's stages), ``dense/`` (the dense export, the judge's dense scores),
``points/<id>/`` (one build folder per point: ``calib/``, ``plan.json``, ``slim_unet/``, ``onnx/slim``,
``verify.json``, ``bench.json``, ``report.json``: the point's record), and ``frontier.json``, ``frontier.md`` and
``frontier.png``. Each stage runs through :func:`slimexport.stages.run_stage`, so a rerun reuses finished points
(a point whose ``report.json`` is recorded under the same key does no work at all) and an interrupted sweep resumes
inside the point it was on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from slimexport.artifacts import (
    ensure_dir,
    load_tensors,
    read_json,
    remove_stale_temporaries,
    save_tensors,
    sha256_json,
    write_json,
    write_result,
    write_text,
)
from slimexport.cache import Manifest, stage_key
from slimexport.config import ALLOCATIONS, TARGETS, BuildConfig, _Config
from slimexport.errors import MissingExtraError, UsageError

log = logging.getLogger("slimexport")

FRONTIER_FORMAT = "slimexport.frontier/1"
POINT_FORMAT = "slimexport.sweep-point/1"
# What a sweep writes into DIR (temporaries start with '.'): any other entry is someone else's.
SWEEP_ENTRIES = frozenset({"manifest.json", "dense", "points", "frontier.json", "frontier.md", "frontier.png"})
# The judge's sampling protocol: the quality harness's defaults (slimexport.harness.eval_quality), so that a sweep's
# dense row is the harness's (docs/quality).
JUDGE_MODEL = "digits"
JUDGE_DEFAULT_SAMPLES = 200
JUDGE_PROTOCOL = {"sample_steps": 10, "guidance": 3.0, "seed": 0, "batch": 100, "boot": 100}


# ---------------------------------------------------------------------------------------------------------------
# the grid


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.9,0.8,0.73"`` → ``(0.9, 0.8, 0.73)``; an entry that is not a number is a UsageError."""
    out = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise UsageError(f"--budgets {text!r}: {item!r} is not a number", "pass fractions, e.g. --budgets 0.9,0.8,0.73") from None
    return tuple(out)


def parse_target_sets(values: Sequence[str] | str) -> tuple[tuple[str, ...], ...]:
    """Each ``--targets`` value (``"attn,ffn"``) as a tuple of target names; checked in :class:`SweepConfig`."""
    values = [values] if isinstance(values, str) else list(values)
    return tuple(tuple(x.strip() for x in v.split(",") if x.strip()) for v in values)


def parse_allocations(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


def point_id(budget: float, targets: Sequence[str], allocation: str) -> str:
    """``attn+ffn-greedy-b0.73``: a point's folder name under ``DIR/points``."""
    return f"{'+'.join(targets)}-{allocation}-b{budget:g}"


@dataclass(frozen=True)
class Point:
    """One grid point: its id, its three coordinates and the whole build config it runs with."""

    id: str
    budget: float
    targets: tuple[str, ...]
    allocation: str
    cfg: BuildConfig


@dataclass(frozen=True)
class SweepConfig(_Config):
    """``slimexport sweep``: a grid of budgets × target sets × allocations over one build config.

    Attributes:
        build: every other setting (model, calibration, budget metric and scope, engine, verify gates, bench); its
            own budget, targets and allocation are replaced by each point's.
        budgets: fractions kept, each in (0, 1] (of what: ``build.compress.alloc.metric`` and ``scope``).
        targets: target sets, each a non-empty subset of ``attn,ffn,resnet,proj``; ``None``: the build's targets.
        allocations: of ``softmax``, ``uniform``, ``greedy``; ``None``: the build's allocation.
        judge_samples: ``digits`` only: generated digits per point scored by the judge (accuracy, Fréchet
            distance); 0 turns the judge off; ``None``: 200 on ``digits`` (the quality harness's default), else 0.
    """

    _nested: ClassVar[dict[str, type]] = {"build": BuildConfig}

    build: BuildConfig = field(default_factory=BuildConfig)
    budgets: tuple[float, ...] = (0.9, 0.8, 0.73, 0.6)
    targets: tuple[tuple[str, ...], ...] | None = None
    allocations: tuple[str, ...] | None = None
    judge_samples: int | None = None

    def __post_init__(self):
        if not isinstance(self.build, BuildConfig):
            raise UsageError(f"SweepConfig.build is {type(self.build).__name__}, not a BuildConfig", "pass a BuildConfig")
        alloc = self.build.compress.alloc
        budgets = tuple(self.budgets) if isinstance(self.budgets, (list, tuple)) else (self.budgets,)
        targets = (alloc.targets,) if self.targets is None else self.targets
        sets = tuple(tuple(t) for t in targets) if isinstance(targets, (list, tuple)) else ()
        allocations = (alloc.method,) if self.allocations is None else self.allocations
        allocs = tuple(allocations) if isinstance(allocations, (list, tuple)) else (allocations,)
        for name, items, example in (("--budgets", budgets, "--budgets 0.9,0.8,0.73"), ("--targets", sets, "--targets attn,ffn"),
                                     ("--allocations", allocs, "--allocations softmax,greedy")):
            if not items:
                raise UsageError(f"the sweep's grid is empty: {name} gives nothing", f"pass e.g. {example}")
        for b in budgets:
            if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and 0 < b <= 1):
                raise UsageError(f"budget {b!r} in --budgets is outside (0, 1]", "pass fractions in (0, 1], e.g. --budgets 0.9,0.8,0.73")
        for s in sets:
            bad = [x for x in s if x not in TARGETS]
            if not s or bad or len(set(s)) != len(s):
                raise UsageError(f"--targets {','.join(s) or repr('')} is not a set of {','.join(TARGETS)}",
                                 "pass each target set once per --targets, e.g. --targets attn,ffn --targets attn,ffn,resnet")
        for a in allocs:
            if a not in ALLOCATIONS:
                raise UsageError(f"allocation {a!r} in --allocations is unknown", f"pass a subset of {','.join(ALLOCATIONS)}")
        j = self.judge_samples
        if j is not None and not (isinstance(j, int) and not isinstance(j, bool) and (j == 0 or (j >= 20 and j % 10 == 0))):
            raise UsageError(f"--judge-samples {j!r} is invalid", "pass 0 (off) or a multiple of 10, at least 20")
        object.__setattr__(self, "budgets", tuple(float(b) for b in budgets))
        object.__setattr__(self, "targets", tuple(tuple(x for x in TARGETS if x in s) for s in sets))  # canonical order
        object.__setattr__(self, "allocations", allocs)
        ids = [p.id for p in self.points()]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise UsageError(f"the sweep's grid names {len(dup)} point(s) twice ({', '.join(dup[:3])})",
                             "pass each budget, target set and allocation once")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["targets"] = [list(t) for t in self.targets]
        return d

    def points(self) -> list[Point]:
        """Every grid point, budgets outermost (largest first: the mildest cuts finish first), then target sets,
        then allocations."""
        out = []
        alloc = self.build.compress.alloc
        for b in sorted(self.budgets, reverse=True):
            for t in self.targets:
                for a in self.allocations:
                    comp = self.build.compress.replace(alloc=alloc.replace(budget=b, targets=t, method=a))
                    out.append(Point(point_id(b, t, a), b, t, a, self.build.replace(compress=comp)))
        return out


# ---------------------------------------------------------------------------------------------------------------
# the Pareto front (pure)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which ``(speedup, error)`` pairs are Pareto-optimal: no other pair is at least as fast with at most the
    error, and strictly better in one of the two. A pair with a NaN or ``None`` is never on the front; equal pairs
    are both on it.

    Args:
        points: ``[(speedup, error), ...]`` (higher speed-up and lower error are better).

    Returns:
        One bool per pair, in order.
    """
    def ok(p) -> bool:
        return all(isinstance(v, (int, float)) and not math.isnan(v) for v in p)

    out = []
    for i, (s, e) in enumerate(points):
        if not ok((s, e)):
            out.append(False)
            continue
        dominated = any(ok((s2, e2)) and s2 >= s and e2 <= e and (s2 > s or e2 < e)
                        for j, (s2, e2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class SweepResult:
    """What :func:`sweep` returns: the folder, the frontier (as in ``frontier.json``) and, per point id, whether
    this run reused it whole."""

    out_dir: Path
    frontier: dict
    reused: dict[str, bool]


def sweep(cfg: SweepConfig | None = None, out: str | Path | None = None, progress: bool = True,
          cache_dir: str | Path | None = None, command: str | None = None, **flags) -> SweepResult:
    """Build every grid point of ``cfg`` on one engine and write the speed–quality frontier into ``out``.

    Args:
        cfg: the grid and the build config (default ``SweepConfig()``).
        out: the sweep folder (required).
        cache_dir: where calibration statistics are shared (as :func:`slimexport.api.compress`'s); the grid's
            points share one calibration through it.
        command: the command line recorded in ``frontier.json`` and ``frontier.md``.
        flags: build settings by the CLI's flag names, applied to ``cfg.build`` (``calib_prompts=16``,
            ``backend="openvino"``), and ``budgets``, ``targets``, ``allocations``, ``judge_samples``.

    Returns:
        :class:`SweepResult`.
    """
    from slimexport.api import compress
    from slimexport.engines.select import (
        check_backend_available,
        check_engine_dtype,
        engine_profile,
        resolve_engine_device,
    )
    from slimexport.flags import apply_flags
    from slimexport.models import load as model_load
    from slimexport.outdir import check_out_dir
    from slimexport.stepcache.build import check_cache_settings

    cfg = _with_flags(cfg if cfg is not None else SweepConfig(), flags, apply_flags)
    if out is None:
        raise UsageError("sweep needs an output folder", "pass --out DIR")
    out_dir = Path(out)
    base = cfg.build
    check_backend_available(base.backend)
    device = resolve_engine_device(base)
    check_engine_dtype(base, device)
    check_out_dir(out_dir, SWEEP_ENTRIES)  # a folder of someone else's files is refused (points/ would go among them)
    points = cfg.points()
    t_start = time.perf_counter()
    bundle = model_load.load_model(base.compress.model, random_weights=base.compress.random_weights,
                                   config_of=base.compress.config_of)
    profile = engine_profile(base, bundle)  # a bad --height fails here, before the first calibration
    check_cache_settings(base, bundle.unet)
    judge_n = _judge_samples(cfg, bundle)
    ensure_dir(out_dir)
    for stale in remove_stale_temporaries(out_dir):
        log.info("removed %s, left by an interrupted run", stale)
    manifest = Manifest(out_dir, identity={"model": base.compress.model, "weights": bundle.identity(), "kind": "sweep"})
    manifest.set("config", cfg.to_dict())
    manifest.save()
    for p in points:
        check_out_dir(out_dir / "points" / p.id)
    run = _Run(cfg, base, bundle, profile, device, out_dir, manifest, judge_n, cache_dir, progress, compress)
    records = []
    reused = {}
    try:
        for i, p in enumerate(points, 1):
            t0 = time.perf_counter()
            rec, reused[p.id] = run.point(p)
            records.append(rec)
            log.info("[sweep %d/%d] %s: speed-up %s, ε error %.4g, final-latent cosine %.4f, gate %s (%.1f s%s, %.0f s in all)",
                     i, len(points), p.id, _speedup_short(rec), rec["fidelity"]["eps_rel_error_mean"],
                     rec["fidelity"]["latent_cosine"], "pass" if rec["passed"] else "FAIL", time.perf_counter() - t0,
                     ", reused" if reused[p.id] else "", time.perf_counter() - t_start)
            frontier = make_frontier(cfg, records, run.header(command))  # after every point: a partial frontier to read
            write_frontier(out_dir, frontier)
    finally:
        run.close()
    return SweepResult(out_dir=out_dir, frontier=frontier, reused=reused)


def _with_flags(cfg: SweepConfig, flags: dict, apply_flags) -> SweepConfig:
    grid = {k: flags.pop(k) for k in ("budgets", "targets", "allocations", "judge_samples") if flags.get(k) is not None}
    if "budgets" in grid and isinstance(grid["budgets"], str):
        grid["budgets"] = parse_budgets(grid["budgets"])
    if "targets" in grid:
        t = grid["targets"]
        grid["targets"] = parse_target_sets(t) if isinstance(t, str) or all(isinstance(x, str) for x in t) else tuple(map(tuple, t))
    if "allocations" in grid and isinstance(grid["allocations"], str):
        grid["allocations"] = parse_allocations(grid["allocations"])
    return cfg.replace(build=apply_flags(cfg.build, flags), **grid) if flags or grid else cfg


def _judge_samples(cfg: SweepConfig, bundle) -> int:
    """Generated samples the judge scores per point: 0 where there is no judge (any model but ``digits``) or no
    scikit-learn (with a note, unless asked for)."""
    asked = cfg.judge_samples
    if bundle.name != JUDGE_MODEL:
        if asked:
            raise UsageError(f"--judge-samples {asked}: the judge scores digits only, not {bundle.name!r}",
                             "drop --judge-samples (or pass 0)")
        return 0
    n = JUDGE_DEFAULT_SAMPLES if asked is None else asked
    if n and importlib.util.find_spec("sklearn") is None:
        if asked:
            raise MissingExtraError("scikit-learn", "quality", "--judge-samples")
        log.warning("sweep: no judge scores (scikit-learn is not installed: pip install 'slimexport[quality]')")
        return 0
    return n


def _speedup_short(rec: dict) -> str:
    ci = rec.get("speedup_ci95")
    return f"{rec['speedup']:.3f}×" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class _Run:
    """A sweep in progress: the shared model, dense export, dense engine (made on first use) and judge."""

    def __init__(self, cfg, base, bundle, profile, device, out_dir, manifest, judge_n, cache_dir, progress, compress):
        from slimexport.calibrate.prompts import read_prompts_file
        from slimexport.engines.onnx_export import export_for_build, read_export
        from slimexport.models.bundle import move
        from slimexport.stages import run_stage

        self.cfg, self.base, self.bundle, self.profile, self.device = cfg, base, bundle, profile, device
        self.out_dir, self.manifest, self.judge_n, self.cache_dir, self.progress = out_dir, manifest, judge_n, cache_dir, progress
        self.compress, self.export = compress, export_for_build  # the build's own export settings
        self._dense_cache = None  # the dense UNet's step-cache record (--cache): made with the first point, shared
        self.dense_memo: dict = {}  # the dense side of verify (export parity, ε, trajectory): computed once
        self.dense = move(bundle.unet, "cpu", torch.float32).eval()
        self.seq_len = int(bundle.encoder.encode([""])[0].shape[1])  # text tokens: 77 for CLIP, 6 for digits
        pf = base.compress.calib.prompts_file
        self.prompts_key = [sha256_json(read_prompts_file(pf))] if pf else []
        self.records: dict = {}
        self.dense_key = stage_key("export", "dense", bundle.identity(), base.export.to_dict(), profile.to_dict())
        folder = out_dir / "dense" / "onnx"
        run_stage(manifest, self.records, "export_dense", self.dense_key, [folder],
                  partial(export_for_build, base, self.dense, folder, profile, self.seq_len))
        self.dense_rebuilt = not self.records["export_dense"].cached
        self.dense_export = read_export(folder)
        self._dense_engine = None
        self._judge = None
        self.latency = None
        if base.compress.alloc.metric == "latency":  # the engine's latency table, measured (or cached) once, as build
            from slimexport.latency.measure import build_table
            from slimexport.outdir import shared_cache

            self.latency = build_table(base, self.dense, profile, device=device, cache_dir=shared_cache(cache_dir) / "latency",
                                       progress=progress, targets=sorted({t for pt in cfg.points() for t in pt.targets}),
                                       dense_onnx=folder)

    def close(self) -> None:
        if self._dense_engine is not None:
            self._dense_engine.close()
            self._dense_engine = None

    def _engine_config(self):
        from slimexport.engines.select import engine_config

        return engine_config(self.base, self.device, self.profile, self.seq_len)

    def _make_engine(self, kind: str, export, model, folder: Path):
        """One engine as :func:`slimexport.engines.select.make_engines` makes it (compiled caches in ``folder``)."""
        from slimexport.engines import base as engines
        from slimexport.engines.select import MODEL_BACKENDS

        backend, ecfg = self.base.backend, self._engine_config()
        if backend == "aoti":
            return engines.build_engine("aoti", model, ecfg.replace(cache_dir=str(folder / "aoti" / kind)))
        if backend == "openvino":
            return engines.build_engine("openvino", export.folder, ecfg.replace(cache_dir=str(folder / "openvino" / kind)))
        return engines.build_engine(backend, model if backend in MODEL_BACKENDS else export.folder, ecfg)

    def dense_engine(self):
        if self._dense_engine is None:
            t0 = time.perf_counter()
            self._dense_engine = self._make_engine("dense", self.dense_export, self.dense, self.out_dir / "dense")
            log.info("sweep: dense %s engine made in %.1f s (shared by every point)", self.base.backend, time.perf_counter() - t0)
        return self._dense_engine

    def point_key(self, p: Point) -> str:
        """Everything a point's record depends on, known before any of its stages runs."""
        table = [self.latency.key.digest, self.latency.dense_ms] if self.latency is not None else []
        return stage_key(POINT_FORMAT, p.cfg.to_dict(), self.bundle.identity(), *self.prompts_key, *table, self.dense_key, self.device,
                         torch.__version__, _version("onnxruntime"), _version("openvino"), self.judge_settings())

    def judge_settings(self) -> dict | None:
        return {"samples": self.judge_n, **JUDGE_PROTOCOL} if self.judge_n else None

    def point(self, p: Point) -> tuple[dict, bool]:
        """The point's record, reused when ``points/<id>/report.json`` is recorded under the same key."""
        pdir = self.out_dir / "points" / p.id
        key = self.point_key(p)
        if (pdir / "manifest.json").exists():
            pman = Manifest(pdir)
            if pman.cached("point", key) and (pdir / "report.json").exists():
                rec = read_json(pdir / "report.json", "sweep point record")
                log.info("[sweep] %s: reused (points/%s/report.json)", p.id, p.id)
                return rec, True
        t0 = time.perf_counter()
        rec = self._compute(p, pdir)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(pdir / "report.json", rec)
        Manifest(pdir).record("point", key, [pdir / "report.json"], rec["seconds"])
        return rec, False

    def _compute(self, p: Point, pdir: Path) -> dict:
        from slimexport.bench.run import run_bench
        from slimexport.engines.onnx_export import read_export
        from slimexport.engines.select import engine_key
        from slimexport.folder import relative_paths
        from slimexport.stages import result_key, run_stage, timed
        from slimexport.verify.run import run_verify

        res = self.compress(p.cfg.compress, out=pdir, bundle=self.bundle, progress=self.progress, cache_dir=self.cache_dir,
                            latency=self.latency)
        records = dict(res.stages)
        pman = Manifest(pdir)
        slim = res.load_slim().eval()
        models = {"dense": self.dense, "slim": slim}
        skey = stage_key("export", "slim", pman.stage("slim")["key"], self.base.export.to_dict(), self.profile.to_dict())
        folder = pdir / "onnx" / "slim"
        run_stage(pman, records, "export_slim", skey, [folder], partial(self.export, p.cfg, slim, folder, self.profile, self.seq_len))
        slim_export = read_export(folder)
        ekey = engine_key(self.dense_key, skey, p.cfg, self.device)
        made: dict = {}

        def engines() -> dict:  # the slim engine only when verify or bench runs
            if "slim" not in made:
                made["slim"] = self._make_engine("slim", slim_export, slim, pdir)
            return {"dense": self.dense_engine(), "slim": made["slim"]}

        # Results are reused only when every artifact they were measured on was reused (as in build).
        rebuilt = self.dense_rebuilt or any(not r.cached for k, r in records.items() if k != "load")
        try:
            parity = run_stage(pman, records, "verify", result_key("verify", ekey, p.cfg), [pdir / "verify.json"],
                               lambda: write_result(pdir / "verify.json", run_verify(p.cfg, self.bundle, models, engines(), self.profile,
                                                                                dense_memo=self.dense_memo)),
                               load=lambda: read_json(pdir / "verify.json", "verification results"), cached=False if rebuilt else None)
            speed = run_stage(pman, records, "bench", result_key("bench", ekey, p.cfg), [pdir / "bench.json"],
                              lambda: write_result(pdir / "bench.json", relative_paths(run_bench(p.cfg, engines(), self.profile), pdir)),
                              load=lambda: read_json(pdir / "bench.json", "benchmark results"), cached=False if rebuilt else None,
                              device=torch.device(self.device))
        finally:
            if "slim" in made:
                made["slim"].close()
        cache = self._cache_point(p, pdir, res, slim, pman, records, ekey, rebuilt) if p.cfg.cache.enabled else None
        judge = None
        if self.judge_n:
            self._judge_dense()
            with timed(records, "judge", False):
                judge = self._judge_point(slim)
        return point_record(p, res.plan, parity, speed, judge,
                            {k: {"seconds": round(v.seconds, 2), "cached": v.cached} for k, v in records.items()}, cache)

    # -- step caching (--cache) ---------------------------------------------------------------------------------

    def _cache_record(self, manifest, records: dict, stage: str, folder: Path, name: str, unet, key: str, res, cached) -> dict:
        """One UNet's full/shallow pair and schedule in ``folder`` (``stepcache/record.json``), as the build's stage."""
        from slimexport.engines.onnx_export import build_export_args
        from slimexport.stepcache.build import record_stage

        return record_stage(manifest, records, stage, key, folder, self.base, self.bundle, {name: unet}, res.stats_dir,
                            build_export_args(self.base, self.dense, self.profile, self.seq_len), cached=cached)

    def _cache_point(self, p: Point, pdir: Path, res, slim, pman, records: dict, ekey: str, rebuilt: bool) -> dict:
        """The point's step caching: the shared dense pair (made once, in ``dense/``), the point's slim pair, then
        the build's checks (pair parity, cached fidelity, per-image loops: dense, slim, cached, cached + slim)."""
        from slimexport.engines.select import engine_config
        from slimexport.stepcache.build import check_stage

        calib_key = pman.stage("calibrate")["key"]
        ckey = stage_key("stepcache", self.base.cache.to_dict(), calib_key)
        if self._dense_cache is None:
            self._dense_cache = self._cache_record(self.manifest, {}, "stepcache_dense", self.out_dir / "dense", "dense", self.dense,
                                                   stage_key(ckey, self.dense_key), res, False if self.dense_rebuilt else None)
        slim_rec = self._cache_record(pman, records, "stepcache", pdir, "slim", slim, stage_key(ckey, pman.stage("slim")["key"]), res,
                                      False if rebuilt else None)
        # One record for the check, paths relative to the sweep folder: each UNet with its own schedule file.
        merged = {"config": slim_rec["config"], "describe": slim_rec["describe"], "unets": {}}
        for rec, root in ((self._dense_cache, Path("dense")), (slim_rec, pdir.relative_to(self.out_dir))):
            for name, entry in rec["unets"].items():
                merged["unets"][name] = {**entry, "schedule": str(root / rec["schedule"]["path"]),
                                         "pair": {**entry["pair"], "path": str(root / entry["pair"]["path"])}}
        check = check_stage(pman, records, stage_key("stepcache_check", ckey, ekey, p.cfg.verify.to_dict()), pdir, p.cfg,
                            self.bundle, {"dense": self.dense, "slim": slim}, self.out_dir, merged, self.profile,
                            engine_config(p.cfg, self.device, self.profile, self.seq_len),
                            cached=False if rebuilt or not records["stepcache"].cached else None,
                            onnx_dirs={"dense": self.out_dir / "dense" / "onnx", "slim": pdir / "onnx" / "slim"})
        return check | {"describe": slim_rec["describe"], "schedules": {k: e["schedules"] for k, e in merged["unets"].items()}}

    # -- the judge (digits) ------------------------------------------------------------------------------------

    def _judge_args(self) -> SimpleNamespace:
        j = JUDGE_PROTOCOL
        return SimpleNamespace(samples=self.judge_n, batch=j["batch"], seed=j["seed"], sample_steps=j["sample_steps"],
                               guidance=j["guidance"])

    def _judge_dense(self):
        """The judge and the dense model's scores (samples, features): a sweep stage, computed once."""
        if self._judge is not None:
            return self._judge
        from slimexport.harness.eval_quality import generate, judge_scores
        from slimexport.stages import run_stage
        from slimexport.verify.quality import DigitsJudge

        t0 = time.perf_counter()
        judge = DigitsJudge.fit()
        folder = self.out_dir / "dense"
        tensors, scores = folder / "judge.safetensors", folder / "judge.json"

        def scored():
            images, labels = generate(self.dense, self.bundle, self._judge_args())
            out, cache = judge_scores(judge, images, labels, None, JUDGE_PROTOCOL["boot"])
            save_tensors(tensors, {"feats": cache["feats"], "correct": cache["correct"]})
            return write_result(scores, out)

        key = stage_key("judge_dense", self.bundle.identity(), self.judge_settings(), judge.test_accuracy)
        dense = run_stage(self.manifest, {}, "judge_dense", key, [tensors, scores], scored,
                          load=lambda: read_json(scores, "dense judge scores"))
        t = load_tensors(tensors, what="dense judge features")
        self._judge = (judge, dense, {"feats": t["feats"], "correct": t["correct"], "fd": dense["fd"]})
        log.info("sweep: judge ready in %.1f s (dense: accuracy %.3f, FD %.2f)", time.perf_counter() - t0, dense["accuracy"], dense["fd"])
        return self._judge

    def _judge_point(self, slim) -> dict:
        from slimexport.harness.eval_quality import generate, judge_scores

        judge, dense, cache = self._judge_dense()
        images, labels = generate(slim, self.bundle, self._judge_args())
        scores, _ = judge_scores(judge, images, labels, cache, JUDGE_PROTOCOL["boot"])
        return scores

    def header(self, command: str | None) -> dict:
        """The frontier's common fields: what ran where."""
        dense_judge = self._judge[1] if self._judge is not None else None
        if self.judge_n and dense_judge is None and (self.out_dir / "dense" / "judge.json").exists():
            dense_judge = read_json(self.out_dir / "dense" / "judge.json", "dense judge scores")
        b = self.base
        return {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "model": b.compress.model, "random_weights": b.compress.random_weights, "weights": self.bundle.identity(),
                "backend": b.backend, "device": self.device, "dtype": b.export.dtype, "profile": self.profile.to_dict(),
                "budget_metric": b.compress.alloc.metric, "budget_scope": b.compress.alloc.scope,
                "calibration": b.compress.calib.to_dict(), "verify": b.verify.to_dict(), "bench": b.bench.to_dict(),
                "judge": ({**self.judge_settings(), "dense": dense_judge} if self.judge_n else None),
                }


def point_record(p: Point, plan, parity: dict, speed: dict, judge: dict | None, stages: dict, cache: dict | None = None) -> dict:
    """One point of ``frontier.json``: its config, cost ratios, measured speed-up and fidelity, and the gate; with
    ``--cache``, ``cache``: the per-image speed-ups and trajectory fidelity of ``slim``, ``cached`` (the dense UNet
    cached) and ``cached+slim`` against the dense uncached loop, and the cache gates."""
    params = plan["params"]
    macs = plan["macs"] if "macs" in plan else None
    sv = parity["slim_vs_dense"]
    traj = sv.get("trajectory") or {}
    exports = {k: bool(parity[f"{k}_export"]["passed"]) for k in ("dense", "slim")}
    return {
        "id": p.id,
        "config": {"budget": p.budget, "targets": list(p.targets), "allocation": p.allocation,
                   "metric": p.cfg.compress.alloc.metric, "scope": p.cfg.compress.alloc.scope},
        "params": {"targeted_ratio": params["targeted_slim"] / params["targeted_dense"],
                   "unet_ratio": params["slim_total"] / params["dense_total"],
                   "targeted_dense": params["targeted_dense"], "targeted_slim": params["targeted_slim"],
                   "dense_total": params["dense_total"], "slim_total": params["slim_total"]},
        "macs": None if macs is None else {"ratio": macs["slim"] / macs["dense"], "dense": macs["dense"], "slim": macs["slim"],
                                           "latent": macs["latent"], "batch": macs["batch"]},
        "speedup": speed["speedup"], "speedup_ci95": speed.get("speedup_ci95"),
        "dense_ms_p50": speed["dense_ms"]["p50"], "slim_ms_p50": speed["slim_ms"]["p50"],
        "iterations": speed["iterations"], "stopped_by": speed.get("stopped_by"),
        "fidelity": {"eps_rel_error_mean": sv["eps_rel_error_mean"], "eps_rel_error": sv["eps_rel_error"],
                     "latent_cosine": traj.get("cosine"), "final_rel_error": traj.get("rel_error"),
                     "trajectory_steps": traj.get("steps")},
        "judge": judge,
        "gate": {"passed": bool(sv["passed"]), "failed": sv.get("failed", []), "reason": sv.get("reason"), **(sv.get("gate") or {})},
        "export_parity": exports,
        "passed": bool(sv["passed"]) and all(exports.values()),
        "cache": None if cache is None else cache_summary(cache),
        "stages": stages,
        "environment": {k: speed.get("environment", {}).get(k) for k in ("device_name", "cpus_available", "torch_threads", "versions")},
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def cache_summary(check: dict) -> dict:
    """A point's step-cache result for the frontier: per-image speed-ups (whole loops vs the dense uncached engine),
    the trajectory fidelity of each variant against the dense uncached UNet, and the gates."""
    per = check["per_image"]
    fid = check["fidelity"]
    return {"describe": check.get("describe"), "schedules": check.get("schedules"), "passed": bool(check["passed"]),
            "pair_parity_passed": all(x["passed"] for v in check["parity"].values() for x in v.values()),
            "steps": per["steps"], "median_s": {k: v["median_s"] for k, v in per["variants"].items()},
            "speedup": dict(per["speedup"]),
            "fidelity": {k: {"latent_cosine": v["final_cosine"], "final_rel_error": v["final_rel_l2"], "passed": bool(v["passed"])}
                         for k, v in fid.items()}}


def cache_rows(records: list[dict]) -> list[dict]:
    """The per-image rows of a sweep with ``--cache``: the dense UNet cached (its loops timed beside every point:
    the median speed-up), then per point its slim UNet and its slim UNet cached; each with the per-image speed-up
    against the dense uncached loop and the final-latent fidelity of the same fixed-seed trajectories, and the
    Pareto flag over (per-image speed-up, final-sample error)."""
    import statistics

    done = [r for r in records if r.get("cache")]
    if not done:
        return []
    first = done[0]["cache"]
    rows = [{"id": "dense+cache", "point": None, "variant": "cached", "speedup": statistics.median(r["cache"]["speedup"]["cached"] for r in done),
             "timed_with": len(done), **first["fidelity"]["cached"]}]
    for r in done:
        c = r["cache"]
        for v, suffix in (("slim", ""), ("cached+slim", "+cache")):
            rows.append({"id": r["id"] + suffix, "point": r["id"], "variant": v, "speedup": c["speedup"][v], "timed_with": 1,
                         **c["fidelity"][v], "passed": bool(c["fidelity"][v]["passed"] and (v == "slim" or c["pair_parity_passed"]))})
    rows[0]["passed"] = bool(rows[0]["passed"] and first["pair_parity_passed"])
    front = pareto_front([(x["speedup"], x["final_rel_error"]) for x in rows])
    return [{**x, "pareto": on} for x, on in zip(rows, front, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# the outputs


def make_frontier(cfg: SweepConfig, records: list[dict], header: dict) -> dict:
    """``frontier.json``'s content: the header, every point done so far (grid order) with its ``pareto`` flag, the
    Pareto point ids by speed-up, and ``complete`` (every grid point is in)."""
    front = pareto_front([(r["speedup"], r["fidelity"]["eps_rel_error_mean"]) for r in records])
    points = [{**r, "pareto": on} for r, on in zip(records, front, strict=True)]
    ids = [r["id"] for r in sorted((r for r in points if r["pareto"]), key=lambda r: -r["speedup"])]
    env = next((r["environment"] for r in records if r.get("environment")), None)
    rows = cache_rows(records)
    cache = None if not rows else {
        "describe": next(r["cache"]["describe"] for r in records if r.get("cache")),
        "steps": next(r["cache"]["steps"] for r in records if r.get("cache")),
        "pareto_objective": "higher per-image speed-up, lower final-sample error", "rows": rows,
        "pareto": [x["id"] for x in sorted((x for x in rows if x["pareto"]), key=lambda x: -x["speedup"])]}
    return {"format": FRONTIER_FORMAT, **header, "environment": env, "grid": {"budgets": list(cfg.budgets), "targets": [list(t) for t in cfg.targets],
                                                          "allocations": list(cfg.allocations)},
            "pareto_objective": "higher measured speed-up, lower mean ε error", "pareto": ids,
            "complete": len(points) == len(cfg.points()), "planned_points": len(cfg.points()), "points": points,
            "cache": cache}


def write_frontier(out_dir: Path, frontier: dict) -> None:
    """``frontier.json``, ``frontier.md`` and ``frontier.png``, each written atomically."""
    from slimexport.frontier_plot import frontier_figure

    write_json(out_dir / "frontier.json", frontier)
    write_text(out_dir / "frontier.md", render_frontier_md(frontier))
    frontier_figure(frontier, out_dir / "frontier.png")


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _window(points: list[dict]) -> str | None:
    """``first – last`` of the points' ``measured_at`` (a rerun that reuses them keeps their dates)."""
    at = sorted(p["measured_at"] for p in points if p.get("measured_at"))
    return None if not at else at[0] if at[0] == at[-1] else f"{at[0]} – {at[-1]}"


def render_frontier_md(fr: dict) -> str:
    """The frontier as a Markdown table sorted by measured speed-up, Pareto-optimal points marked ★."""
    env = fr.get("environment") or {}
    prof = fr["profile"]
    judge = fr.get("judge")
    lines = [f"# Speed–quality frontier: `{fr['model']}`{' (random weights)' if fr['random_weights'] else ''} on "
             f"{fr['backend']} {fr['dtype']}", "",
             f"{len(fr['points'])} points" + ("" if fr.get("complete", True) else f" of {fr['planned_points']} (the sweep is "
                                              "running or was interrupted: rerun it to finish)")
             + f", measured {_window(fr['points']) or fr['date']}, {env.get('device_name') or fr['device']}"
             + (f", {env['cpus_available']} CPU threads available" if env.get("cpus_available") else "") + ".",
             f"Engine profile: batch {prof['opt_batch']} rows (CFG), {prof['opt_height']}×{prof['opt_width']} latents. "
             f"Budget: a fraction of the {fr['budget_scope']} {'MACs' if fr['budget_metric'] == 'macs' else fr['budget_metric']}.",
             ""]
    if fr.get("command"):
        lines += [f"Command: `{fr['command']}`", ""]
    head = ("| | point | budget | targets | allocation | targeted params kept | UNet MACs | speed-up (95% interval) | "
            "mean ε error | final-latent cosine | final-sample error |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|"
    if judge:
        head += " judge accuracy % | FD |"
        sep += "---|---|"
    head += " gate |"
    sep += "---|"
    lines += [head, sep]
    if judge and judge.get("dense"):
        d = judge["dense"]
        lines.append("| | dense | 1 | – | – | 1.000 | 1.000 | 1 | 0 | 1 | 0 | "
                     f"{100 * d['accuracy']:.1f} | {d['fd']:.2f} ± {d['fd_std']:.2f} | – |")
    for r in sorted(fr["points"], key=lambda r: -r["speedup"]):
        c, f = r["config"], r["fidelity"]
        ci = r.get("speedup_ci95")
        row = (f"| {'★' if r['pareto'] else ''} | `{r['id']}` | {c['budget']:g} | {','.join(c['targets'])} | {c['allocation']} | "
               f"{r['params']['targeted_ratio']:.3f} | {_fmt((r.get('macs') or {}).get('ratio'), '.3f')} | "
               f"{r['speedup']:.3f}×" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "") + " | "
               f"{_fmt(f['eps_rel_error_mean'], '.4g')} | {_fmt(f['latent_cosine'], '.4f')} | {_fmt(f['final_rel_error'], '.4g')} |")
        if judge:
            j = r.get("judge") or {}
            acc = f"{100 * j['accuracy']:.1f} ({100 * j['accuracy_delta']:+.1f})" if "accuracy_delta" in j else "–"
            fd = f"{j['fd']:.2f} ({j['fd_delta']:+.2f} ± {j['fd_delta_std']:.2f})" if "fd_delta" in j else "–"
            row += f" {acc} | {fd} |"
        row += f" {'pass' if r['passed'] else 'FAIL'} |"
        lines.append(row)
    gate = next((r["gate"] for r in fr["points"]), {})
    lines += ["", "★: Pareto-optimal: no other point is at least as fast with at most its mean ε error (and better in one).",
              "Speed-up: p50 dense / p50 slim on the engine, interleaved, with a paired-bootstrap 95% interval. "
              "Mean ε error: ‖ε_slim − ε_dense‖ / ‖ε_dense‖ averaged over the verify timesteps; final-latent cosine and "
              "final-sample error (relative L2): a fixed-seed trajectory, slim vs dense."
              + (f" Gate (the build's default): mean ε error ≤ {gate.get('max_eps_error'):g} and final-latent cosine ≥ "
                 f"{gate.get('min_latent_cosine'):g} ({gate.get('basis')}), and both export parities."
                 if gate.get("max_eps_error") is not None else "")]
    if fr.get("cache"):
        lines += ["", *render_cache_md(fr["cache"])]
    if judge:
        lines.append(f"Judge: {judge['samples']} generated digits per row ({judge['sample_steps']} DDIM steps, CFG "
                     f"{judge['guidance']:g}, the same seeds for every model); accuracy (Δ vs dense, points) and Fréchet "
                     "distance to the real held-out digits (Δ vs dense ± paired bootstrap std).")
    return "\n".join(lines) + "\n"


def render_cache_md(cache: dict) -> list[str]:
    """The step-caching section of ``frontier.md``: per-image rows sorted by speed-up, Pareto-optimal ones ★."""
    lines = [f"## Step caching ({cache['describe']}): per image, {cache['steps']}-step loops", "",
             "| | row | UNet | per-image speed-up | final-latent cosine | final-sample error | gate |",
             "|---|---|---|---|---|---|---|"]
    for x in sorted(cache["rows"], key=lambda x: -x["speedup"]):
        unet = {"cached": "dense, cached", "slim": "slim", "cached+slim": "slim, cached"}[x["variant"]]
        lines.append(f"| {'★' if x['pareto'] else ''} | `{x['id']}` | {unet} | {x['speedup']:.3f}× | "
                     f"{_fmt(x['latent_cosine'], '.4f')} | {_fmt(x['final_rel_error'], '.4g')} | {'pass' if x['passed'] else 'FAIL'} |")
    lines += ["", "Per-image speed-up: the median whole denoising loop (every engine call, CFG, batch 1) of the dense "
              "uncached engine over the row's, interleaved in the same process"
              + (f" (`dense+cache`: the median of its {cache['rows'][0]['timed_with']} points' loops)" if cache["rows"][0]["timed_with"] > 1 else "")
              + ". Cosine and final-sample error: the final latents of the verify's fixed-seed trajectories against the "
              "dense uncached PyTorch UNet; gate: that cosine and the full/shallow pair parity. ★: no other row is at "
              "least as fast with at most its final-sample error."]
    return lines


__all__ = ["FRONTIER_FORMAT", "Point", "SweepConfig", "SweepResult", "cache_rows", "cache_summary", "make_frontier",
           "pareto_front", "parse_allocations", "parse_budgets", "parse_target_sets", "point_id", "render_frontier_md", "sweep", "write_frontier"]
