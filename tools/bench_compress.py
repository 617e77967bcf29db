"""Time and memory of ``slimexport compress`` on one model: per-stage wall seconds and peak memory.

    python tools/bench_compress.py --model sd14 --random-weights --prompts 2 --steps 2 --budget 0.73

Prints one row per stage and a summary with machine, device and date, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd14")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="calibration image size in pixels")
    ap.add_argument("--budget", type=float, default=0.73)
    ap.add_argument("--targets", default="attn,ffn")
    ap.add_argument("--allocation", default="softmax", choices=("softmax", "uniform", "greedy"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    from slimexport.api import compress
    from slimexport.config import AllocConfig, CalibConfig, CompressConfig

    cfg = CompressConfig(
        model=args.model, random_weights=args.random_weights, device=args.device,
        calib=CalibConfig(num_prompts=args.prompts, num_steps=args.steps, num_bins=min(5, args.steps),
                          batch_size=args.batch, height=args.size, width=args.size),
        alloc=AllocConfig(budget=args.budget, targets=tuple(args.targets.split(",")), method=args.allocation),
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = compress(cfg, out=f"{tmp}/out", cache_dir=f"{tmp}/cache", progress=False)
        wall = time.perf_counter() - t0
        stats_bytes = sum(f.stat().st_size for f in res.stats_dir.iterdir())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.processor() or "cpu"
    out = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.node()} ({torch.get_num_threads()} threads)",
        "device": device, "model": args.model, "random_weights": args.random_weights, "prompts": args.prompts,
        "steps": args.steps, "budget": args.budget, "targets": args.targets, "allocation": args.allocation, "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_rss), "stats_mb": round(stats_bytes / 2**20),
        "stages": {k: {"seconds": round(v.seconds, 2), "cached": v.cached, "peak_mb": v.peak_memory_mb} for k, v in res.stages.items()},
        "params": res.plan["params"], "macs": res.plan.get("macs"),
    }
    for k, v in out["stages"].items():
        print(f"{k:10s} {v['seconds']:8.2f} s  peak {v['peak_mb']} MB", flush=True)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
