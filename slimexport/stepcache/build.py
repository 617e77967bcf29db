"""Step caching inside ``slimexport build --cache auto|N``: the checks and the speed a user feels.

:func:`slimexport.stepcache.api.cache_stage` plans and exports a full/shallow pair per UNet (dense and slim); here
the pairs are run on the build's backend and checked:

- **pair parity**: each exported graph against the PyTorch split UNet on the verification's fixed inputs (the
  shallow graph fed PyTorch's own cache), with the export tolerance of the build's dtype;
- **trajectory fidelity**: cached sampling (engines, by the plan) against the dense *uncached* PyTorch UNet from
  the same seeds, the final latents gated by the slim-vs-dense trajectory gate (``--min-latent-cosine``; default
  :func:`slimexport.verify.parity.default_gate`);
- **per-image speed**: whole denoising loops (every engine call, CFG, batch 1), dense vs slim vs cached vs
  cached + slim, interleaved, at the middle of ``CacheConfig.steps``.

The result is ``stepcache/check.json``; the report's verdict includes its gates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from slimexport.artifacts import read_json, write_result
from slimexport.cache import stage_key
from slimexport.errors import UsageError
from slimexport.stages import run_stage
from slimexport.stepcache.api import cache_stage, pair_dir
from slimexport.stepcache.engines import pair_engines
from slimexport.stepcache.export import CACHE, CachedEngineUNet, EngineUNet
from slimexport.stepcache.schedule import SCHEDULE_FILE, read_schedule
from slimexport.stepcache.unet import SplitUNet, check_depth

log = logging.getLogger(__name__)

# Backends that run the pair: the ONNX pair on ONNX Runtime, OpenVINO or TensorRT (its profile covers the cache's
# Hc/Wc axes), the PyTorch paths on torch or compiled by AOTInductor (aoti).
PAIR_BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch", "aoti")
RECORD_FILE = "stepcache/record.json"
CHECK_FILE = "stepcache/check.json"
TIMING_ROUNDS = 2  # whole loops per variant (the first variant of the rotation changes every round)


def check_cache_settings(cfg, unet) -> None:
    """Refuse, before the long stages, ``--cache`` with a backend that cannot run the pair or a depth beyond the UNet."""
    if not cfg.cache.enabled:
        return
    if cfg.backend not in PAIR_BACKENDS:
        raise UsageError(f"--cache runs its full/shallow engine pair on {' or '.join(PAIR_BACKENDS)} so far, not "
                         f"--backend {cfg.backend}", "use --backend onnxruntime (or openvino, tensorrt, torch, aoti), or --cache off")
    try:
        check_depth(unet, cfg.cache.depth)
    except UsageError as err:
        raise UsageError(f"--cache-depth: {err.message}", err.fix) from None


def cache_stages(manifest, records: dict, cfg, bundle, models: dict, out_dir: Path, keys: dict[str, str], ekey: str,
                 stats_dir: Path, profile, ecfg, export_kw: dict, rebuilt: bool) -> dict:
    """A build's step caching (``--cache``): the dense and slim full/shallow pairs with their schedule (stage
    ``stepcache``), then their checks (``stepcache_check``); the record, with the check under ``"check"``.

    ``keys``: the ``dense`` and ``slim`` export keys and the ``calibrate`` key; ``ekey``: the engines' key;
    ``export_kw``: the build's export settings; ``rebuilt``: an upstream artifact was made afresh in this run."""
    ckey = stage_key("stepcache", cfg.cache.to_dict(), keys["dense"], keys["slim"], keys["calibrate"])
    cache = record_stage(manifest, records, "stepcache", ckey, out_dir, cfg, bundle, models, stats_dir, export_kw,
                         cached=False if rebuilt else None)
    cache["check"] = check_stage(manifest, records, stage_key("stepcache_check", ckey, ekey, cfg.verify.to_dict()), out_dir,
                                 cfg, bundle, models, out_dir, cache, profile, ecfg,
                                 cached=False if rebuilt or not records["stepcache"].cached else None)
    return cache


def record_stage(manifest, records: dict, stage: str, key: str, folder: Path, cfg, bundle, unets: dict, stats_dir: Path,
                 export_kw: dict, cached: bool | None = None) -> dict:
    """Stage ``stage``: each of ``unets``' full/shallow pair and their schedule in ``folder``, planned on the
    calibration's prompts (``stats_dir``); the record (:func:`~slimexport.stepcache.api.cache_stage`) is kept in
    ``folder/stepcache/record.json``."""
    from slimexport.calibrate.stats import CalibStats

    rec_path = folder / RECORD_FILE
    return run_stage(manifest, records, stage, key, [folder / SCHEDULE_FILE, rec_path, *(pair_dir(folder, n) for n in unets)],
                     lambda: write_result(rec_path, cache_stage(bundle, unets, folder, cfg.cache,
                                                                prompts=CalibStats.read_prompts(stats_dir),
                                                                calib=cfg.compress.calib, **export_kw)),
                     load=lambda: read_json(rec_path, "step-cache record"), cached=cached)


def check_stage(manifest, records: dict, key: str, folder: Path, cfg, bundle, models: dict, root: Path, record: dict,
                profile, ecfg, cached: bool | None = None, onnx_dirs: dict[str, Path] | None = None) -> dict:
    """Stage ``stepcache_check``: :func:`check_cached` kept in ``folder/stepcache/check.json`` (paths in ``record``
    relative to ``root``)."""
    check_path = folder / CHECK_FILE
    return run_stage(manifest, records, "stepcache_check", key, [check_path],
                     lambda: write_result(check_path, check_cached(cfg, bundle, models, root, record, profile, ecfg,
                                                                   onnx_dirs=onnx_dirs)),
                     load=lambda: read_json(check_path, "step-cache check"), cached=cached)


def timing_steps(steps: tuple[int, ...]) -> int:
    """The step count the per-image timing uses: the middle of the configured ones (25 of 10, 25, 50)."""
    return sorted(steps)[len(steps) // 2]


@torch.no_grad()
def pair_parity(unet, depth: int, full, shallow, inputs: list[dict[str, np.ndarray]], tol) -> dict:
    """Both graphs of a pair against :class:`SplitUNet` in fp32 PyTorch (the shallow one on PyTorch's cache)."""
    from slimexport.verify.parity import _cast, summarize

    split = SplitUNet(unet.eval(), depth)
    out_name = full.io_spec["outputs"][0]["name"]
    pairs = {"full": [], "shallow": []}
    for feeds in inputs:
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        eps, cache = split.full(t["sample"], t["timestep"], t["encoder_hidden_states"])
        got = full.run(_cast(feeds, full.io_spec))
        pairs["full"].append((got[out_name].astype(np.float32), eps.numpy()))
        ref = split.shallow(t["sample"], t["timestep"], t["encoder_hidden_states"], cache)
        got = shallow.run(_cast({**feeds, CACHE: cache.numpy()}, shallow.io_spec))
        pairs["shallow"].append((got[out_name].astype(np.float32), ref.numpy()))
    return {k: summarize(v, tol) for k, v in pairs.items()}


def check_cached(cfg, bundle, models: dict, out_dir: Path, record: dict, profile, ecfg,
                 onnx_dirs: dict[str, Path] | None = None) -> dict:
    """Parity, fidelity and per-image speed of every cached UNet of a build (``stepcache/check.json``'s content).

    Args:
        cfg: the ``BuildConfig``; models: ``{"dense", "slim"}`` fp32 PyTorch UNets on the CPU.
        record: what :func:`~slimexport.stepcache.api.cache_stage` returned (the manifest's ``stepcache`` entry);
            paths relative to ``out_dir``; a UNet's entry may name its own ``"schedule"`` file (a sweep's dense
            pair is shared by its points), else ``record["schedule"]``.
        profile, ecfg: the engines' profile and ``EngineConfig`` (as the build's own engines).
        onnx_dirs: name -> the uncached UNet's ONNX folder (default ``out_dir/onnx/<name>``, a build's layout).

    Returns:
        ``{"passed", "gate", "parity": {name: {"full", "shallow"}}, "fidelity": {variant: ...},
        "per_image": {"steps", "variants": {name: {"seconds", "median_s", "pattern"}}, "speedup": {name: ×}}}``.
    """
    from slimexport.engines.base import build_engine
    from slimexport.stepcache.fidelity import cached_vs_dense
    from slimexport.verify.parity import default_gate, export_tolerance, fixed_inputs, fixed_prompts

    hw = (profile.opt_height, profile.opt_width)
    vcfg, basis = default_gate(cfg.verify, bundle)
    plans = {name: read_schedule(out_dir / entry.get("schedule", record.get("schedule", {}).get("path", "")), name)
             for name, entry in record["unets"].items()}
    onnx_dirs = {name: out_dir / "onnx" / name for name in ("dense", "slim")} | dict(onnx_dirs or {})
    tol = export_tolerance(cfg.export.dtype, vcfg)
    inputs = fixed_inputs(bundle, vcfg.replace(num_prompts=1), hw)
    engines: dict = {}
    try:
        for name, entry in record["unets"].items():
            engines[name] = pair_engines(cfg.backend, models[name], out_dir / entry["pair"]["path"], entry["pair"]["depth"], ecfg)
        for name in ("dense", "slim"):
            source = models[name] if cfg.backend == "torch" else onnx_dirs[name]
            engines[f"{name}-uncached"] = build_engine(cfg.backend, source, ecfg)
        parity = {name: pair_parity(models[name], entry["pair"]["depth"], *engines[name], inputs, tol)
                  for name, entry in record["unets"].items()}
        variants = {"dense": EngineUNet(engines["dense-uncached"]), "slim": EngineUNet(engines["slim-uncached"])}
        for name in record["unets"]:
            variants["cached" if name == "dense" else f"cached+{name}"] = CachedEngineUNet(*engines[name], plans[name])
        prompts = fixed_prompts(bundle, vcfg.num_prompts)
        fidelity = {}
        for v in variants:
            if v == "dense":
                continue
            log.info("stepcache: trajectory fidelity of %s vs dense uncached (%d steps)", v, vcfg.trajectory_steps)
            fidelity[v] = cached_vs_dense(bundle, models["dense"], variants[v], prompts, steps=vcfg.trajectory_steps,
                                          guidance=vcfg.guidance_scale, seed=vcfg.seed, latent_hw=hw,
                                          min_cosine=vcfg.min_latent_cosine)
        steps = timing_steps(cfg.cache.steps)
        per_image = _per_image(bundle, variants, prompts[0], hw, steps, vcfg.guidance_scale, vcfg.seed)
    finally:
        for e in engines.values():
            for x in (e if isinstance(e, tuple) else (e,)):
                x.close()
    passed = (all(p["passed"] for v in parity.values() for p in v.values())
              and all(f["passed"] for k, f in fidelity.items() if k.startswith("cached")))
    return {"passed": passed, "gate": {"min_latent_cosine": vcfg.min_latent_cosine, "basis": basis,
                                       "pair_parity": tol.to_dict()},
            "parity": parity, "fidelity": fidelity, "per_image": per_image}


def _per_image(bundle, variants: dict, prompt: str, hw: tuple[int, int], steps: int, guidance: float, seed: int) -> dict:
    from slimexport.calibrate.runner import initial_latents
    from slimexport.stepcache.bench import time_images

    with torch.no_grad():
        cond = bundle.encoder.encode([prompt])[0].float()
        uncond = bundle.encoder.encode([""])[0].float()
    c = int(bundle.unet.config.in_channels)
    latents = initial_latents([seed], (c, *hw), "cpu", torch.float32, bundle.make_scheduler().init_noise_sigma)
    log.info("stepcache: timing whole %d-step loops of %s (%d rounds)", steps, ", ".join(variants), TIMING_ROUNDS)
    rec = time_images(variants, bundle, cond, uncond, latents, [steps], guidance, rounds=TIMING_ROUNDS)[steps]
    base = rec["dense"]["median_s"]
    return {"steps": steps, "rounds": TIMING_ROUNDS, "batch": 1, "guidance": guidance,
            "variants": {k: {"seconds": [round(s, 4) for s in v["seconds"]], "median_s": round(v["median_s"], 4),
                             "pattern": v["pattern"]} for k, v in rec.items()},
            "speedup": {k: round(base / v["median_s"], 4) for k, v in rec.items()}}
