"""Per-image latency of cached sampling with engines: whole denoising loops, dense vs cached (vs slim, cached + slim).

What a user waits for is the loop, not one UNet call: :func:`time_images` times complete sampling runs
(:func:`slimexport.stepcache.export.sample_with_engines`: every engine call, the host copies and the scheduler
steps), the variants interleaved (the order rotates every round) on the same seeded latents. :func:`time_calls`
times single full and shallow engine calls, interleaved, for the per-call figures beside it.

The uncached baseline runs each UNet's *full* engine at every step: the same graph as the plain UNet export with
the cache as an extra output (a copy of one feature map per call).

    python tools/bench_stepcache.py --model sd14 --random-weights --cache 3 --steps 25,50 --size 256
    python tools/bench_stepcache.py --model sd14 --random-weights --cache 3 --steps 25,50 --size 512 \
        --backend torch --device cuda --dtype fp16     # GPU: the PyTorch paths in fp16 with CUDA graphs
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def _median(xs) -> float:
    return float(statistics.median(xs))


def time_images(variants: dict, bundle, cond, uncond, latents, steps_list, guidance: float, rounds: int = 1) -> dict:
    """Seconds per image of each variant at each step count.

    Args:
        variants: name -> an ``EngineUNet``/``CachedEngineUNet`` (or any UNet-like callable of the sampler).
        cond, uncond: ``[B, L, D]`` conditioning (``uncond`` ``None``: no CFG); latents: ``[B, C, h, w]`` start.
        rounds: timed runs per variant and step count (the first variant of the rotation changes every round).

    Returns:
        ``{steps: {name: {"seconds": [...], "median_s", "pattern", "final_rel_to_first"}}}``; ``final_rel_to_first``:
        relative L2 distance of the final latents to the first variant's (numerics, not quality).
    """
    from slimexport.stepcache.export import sample_with_engines
    from slimexport.verify.metrics import relative_l2

    names = list(variants)
    out: dict = {}
    for steps in steps_list:
        rec = {n: {"seconds": []} for n in names}
        finals = {}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            if r % 2:
                order = order[::-1]
            for n in order:
                t0 = time.perf_counter()
                x = sample_with_engines(variants[n], bundle, cond, uncond, latents, steps, guidance)
                rec[n]["seconds"].append(time.perf_counter() - t0)
                finals[n] = x.float()
                log.info("steps %d %-14s %.2f s", steps, n, rec[n]["seconds"][-1])
        for n in names:
            rec[n]["median_s"] = _median(rec[n]["seconds"])
            rec[n]["pattern"] = getattr(variants[n], "history", None)
            rec[n]["final_rel_to_first"] = relative_l2(finals[n], finals[names[0]])
        out[steps] = rec
    return out


def time_calls(engines: dict, feeds: dict, iterations: int = 3, warmup: int = 1) -> dict:
    """Milliseconds per call of each engine on ``feeds`` (a shallow engine's ``cache`` input included), interleaved.

    Args:
        engines: name -> (engine, its feeds key in ``feeds``).
    Returns:
        ``{name: {"ms": [...], "median_ms"}}``.
    """
    for eng, key in engines.values():
        for _ in range(warmup):
            eng.run(feeds[key])
    times = {n: [] for n in engines}
    for i in range(iterations):
        order = list(engines) if i % 2 == 0 else list(engines)[::-1]
        for n in order:
            eng, key = engines[n]
            t0 = time.perf_counter()
            eng.run(feeds[key])
            times[n].append(1e3 * (time.perf_counter() - t0))
    return {n: {"ms": v, "median_ms": _median(v)} for n, v in times.items()}


def cpu_model() -> str:
    """``Model name:`` of ``lscpu`` (the machine line the results carry)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_stepcache.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd14", help="registry name or folder")
    p.add_argument("--random-weights", action="store_true", help="the registry architecture with seeded random weights")
    p.add_argument("--slim", type=Path, default=None, help="a slim UNet folder (compress/build output): adds slim rows")
    p.add_argument("--cache", default="3", help="cache interval N (auto needs a measured profile: --profile)")
    p.add_argument("--profile", type=Path, default=None, help="auto: a change.json (measure.ChangeProfile)")
    p.add_argument("--depth", type=int, default=1, help="cache depth")
    p.add_argument("--steps", default="25,50", help="DDIM step counts")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (square)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (> 1: UNet batch 2 per prompt)")
    p.add_argument("--rounds", type=int, default=1, help="timed images per variant and step count")
    p.add_argument("--call-iterations", type=int, default=3, help="timed single calls per engine")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: this process's CPUs)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino", "torch"),
                   help="engines of the pair: the exported ONNX pair (onnxruntime, openvino) or the PyTorch paths (torch)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda with --backend torch (CUDA graphs, channels_last)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="engine precision (fp16: GPU)")
    p.add_argument("--work", type=Path, default=Path("engines") / "bench-stepcache", help="where the ONNX pairs go")
    p.add_argument("--reuse", action="store_true", help="reuse pairs already exported in --work (same depth)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    p.add_argument("--variants", default="dense,cached,slim,cached+slim", help="rows to time, of dense,cached,slim,cached+slim")
    return p.parse_args(argv)


def _pair(unet, folder: Path, depth: int, size: tuple[int, int], reuse: bool) -> dict:
    from slimexport.stepcache.export import export_cache_pair, read_pair

    if reuse and (folder / "pair.json").exists():
        rec = read_pair(folder, verify=True)
        if rec["depth"] == depth:
            log.info("reusing %s", folder)
            return rec
    c = unet.config
    shape = (2, int(c.in_channels), *size)
    return export_cache_pair(unet, folder, depth, sample_shape=shape)


def run(args, command: str = "") -> dict:
    from slimexport.config import parse_cache_mode
    from slimexport.engines.base import EngineConfig
    from slimexport.models import load_model
    from slimexport.stepcache import CacheConfig, CachePlan
    from slimexport.stepcache.engines import pair_engines
    from slimexport.stepcache.export import CACHE, CachedEngineUNet, EngineUNet
    from slimexport.stepcache.measure import ChangeProfile

    t_start = time.perf_counter()
    steps_list = [int(s) for s in args.steps.split(",") if s]
    wanted = [v for v in args.variants.split(",") if v]
    mode = parse_cache_mode(args.cache)
    plan = CachePlan(CacheConfig(mode=mode, depth=args.depth),
                     ChangeProfile.load(args.profile) if args.profile else None)
    bundle = load_model(args.model, random_weights=args.random_weights)
    h, w = bundle.latent_size(args.size, args.size)
    with torch.no_grad():
        cond = bundle.encoder.encode(["a photograph of an astronaut riding a horse"])[0].float()
        uncond = bundle.encoder.encode([""])[0].float() if args.guidance > 1 else None
    latents = torch.randn(1, int(bundle.unet.config.in_channels), h, w, generator=torch.Generator().manual_seed(0))
    latents = latents * bundle.make_scheduler().init_noise_sigma
    unets = {"dense": bundle.unet.eval()}
    if args.slim is not None and any("slim" in v for v in wanted):
        from slimexport.slim.apply import load_slim_unet

        unets["slim"] = load_slim_unet(args.slim)
    pairs, export_s = {}, {}
    for name, unet in unets.items():
        t0 = time.perf_counter()
        if args.backend == "torch":  # no export: the PyTorch paths themselves
            from slimexport.stepcache.unet import cache_channels, cache_scale

            pairs[name] = {"depth": args.depth, "cache_channels": cache_channels(unet, args.depth),
                           "cache_scale": cache_scale(unet, args.depth)}
        else:
            pairs[name] = _pair(unet, args.work / f"{name}-cache", args.depth, (h, w), args.reuse)
        export_s[name] = round(time.perf_counter() - t0, 1)
    macs = {}
    try:
        from slimexport.models.macs import count_macs

        macs = {n: count_macs(u, batch=1, height=h, width=w)["total"] for n, u in unets.items()}
    except Exception as err:  # MACs are a side figure; the timing does not depend on them
        log.warning("MAC count failed: %s", err)
    cuda_torch = args.backend == "torch" and args.device.startswith("cuda")
    act = "float16" if args.dtype == "fp16" else "float32"
    ecfg = EngineConfig(threads=args.threads, device=args.device, dtype=args.dtype, cuda_graphs=cuda_torch,
                        channels_last=cuda_torch, seq_len=int(cond.shape[1]))
    engines = {n: pair_engines(args.backend, unets[n], args.work / f"{n}-cache", args.depth, ecfg) for n in pairs}
    del unets
    bundle.unet = None
    variants = {}
    for v in wanted:
        name = "slim" if "slim" in v else "dense"
        if name not in engines:
            continue
        full, shallow = engines[name]
        variants[v] = (CachedEngineUNet(full, shallow, plan, dtype=act) if v.startswith("cached")
                       else EngineUNet(full, dtype=act))
    # single calls: CFG batch at this size, timestep [1]; the shallow engine fed the full engine's cache
    rows = 2 if uncond is not None else 1
    rng = np.random.default_rng(0)
    feeds = {"x": {"sample": rng.standard_normal((rows, latents.shape[1], h, w)).astype(act),
                   "timestep": np.array([500.0], dtype="float32"),
                   "encoder_hidden_states": np.concatenate([cond.numpy()] * rows).astype(act)}}
    calls = {}
    for n, (full, shallow) in engines.items():
        feeds[f"{n}-cache"] = {**feeds["x"], CACHE: full.run(feeds["x"])[CACHE]}
        calls[f"{n}/full"], calls[f"{n}/shallow"] = (full, "x"), (shallow, f"{n}-cache")
    per_call = time_calls(calls, feeds, iterations=args.call_iterations)
    images = time_images(variants, bundle, cond, uncond, latents, steps_list, args.guidance, args.rounds)
    first = next(iter(variants))  # the baseline: dense, uncached
    speedups = {str(s): {v: images[s][first]["median_s"] / rec["median_s"] for v, rec in images[s].items()} for s in images}
    info = engines["dense"][0].info()
    results = {
        "command": command, "date": time.strftime("%Y-%m-%d"), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"lscpu_model": cpu_model(), "cpus_available": info.get("threads"), "platform": platform.platform()},
        "backend": info, "model": args.model, "random_weights": args.random_weights, "slim": str(args.slim) if args.slim else None,
        "latent": [h, w], "image_px": args.size, "unet_batch": rows, "guidance": args.guidance,
        "cache": plan.config.describe(),
        "schedules": {str(s): plan.schedule_for_steps(s, bundle.make_scheduler).pattern() for s in steps_list},
        "macs_per_image_call": macs, "export_seconds": export_s,
        "pairs": {n: {k: p[k] for k in ("depth", "cache_channels", "cache_scale")} for n, p in pairs.items()},
        "per_call_ms": per_call,
        "per_call_shallow_over_full": {n: per_call[f"{n}/shallow"]["median_ms"] / per_call[f"{n}/full"]["median_ms"]
                                       for n in engines},
        "per_call_speedup_shallow": {n: per_call["dense/full"]["median_ms"] / per_call[f"{n}/shallow"]["median_ms"]
                                     for n in engines},
        "per_call_speedup_full": {n: per_call["dense/full"]["median_ms"] / per_call[f"{n}/full"]["median_ms"] for n in engines},
        "per_image": {str(k): v for k, v in images.items()},
        "per_image_speedup": speedups,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.out:
        from slimexport.artifacts import write_json

        write_json(args.out, results)
    return results


def main(argv=None, command: str = "python tools/bench_stepcache.py") -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    res = run(args, " ".join([command, *argv]))
    print(json.dumps({k: res[k] for k in ("per_call_ms", "per_call_shallow_over_full", "per_image_speedup", "schedules",
                                          "seconds")}, indent=1, default=str))
    return 0
