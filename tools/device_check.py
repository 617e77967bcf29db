"""One GPU check anyone can rerun: compress SD1.4 (random weights), time dense vs slim, calibration throughput.

    OUT=/tmp/out python tools/device_check.py [--deadline 150] [--prompts 8 --steps 4] [--kernels] [--onnx]

Sections (each prints rows as measured and rewrites $OUT/device_check.json; a failing section is recorded
and the next one runs; sections that would start after --deadline seconds are skipped and say so):

1. ``compress``: ``sd14 --random-weights`` at budget 0.73 (attn,ffn) with a small calibration on the GPU
   (fp16 UNet, fp32 statistics): stage times, image-evaluations/s, peak GPU memory, MADAC seconds.
2. ``resnet``: the same statistics, ``--targets attn,ffn,resnet`` at a whole-UNet budget of 0.73.
3. ``speed``: dense vs each slim UNet, fp16, channels_last, CUDA graphs, interleaved, UNet batch 2 and 8 at 64×64.
4. ``hooks``: the calibration denoising loop without hooks, for the hook overhead ratio.
5. ``speed_extra``: the attention+FFN slim UNet at batch 1 (64×64) and batch 2 at 96×96 / 128×128.
6. ``kernels`` (``--kernels``): tools/bench_kernels.py.  7. ``onnx`` (``--onnx``): export at 32×32, ORT-CPU check.

Without CUDA it degrades to a smoke run on the ``tiny`` model (seconds), so it can be tested anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Recorder:
    def __init__(self, out_dir: Path, deadline: float):
        self.path = out_dir / "device_check.json"
        self.t0 = time.perf_counter()
        self.deadline = deadline
        self.data: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "sections": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def section(self, name: str, fn, *args) -> None:
        if self.elapsed() > self.deadline:
            print(f"[{name}] skipped: {self.elapsed():.0f} s > deadline {self.deadline:.0f} s", flush=True)
            self.data["sections"][name] = {"skipped": "deadline"}
            self.save()
            return
        t = time.perf_counter()
        print(f"[{name}] start at {self.elapsed():.1f} s", flush=True)
        try:
            res = fn(*args)
            self.data["sections"][name] = {"seconds": round(time.perf_counter() - t, 2), **(res or {})}
        except Exception as err:  # noqa: BLE001 - record and go on: one broken section must not cost the others
            traceback.print_exc()
            self.data["sections"][name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"[{name}] done in {time.perf_counter() - t:.1f} s", flush=True)
        self.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadline", type=float, default=150.0, help="start no section after this many seconds")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bins", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--onnx", action="store_true")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out_dir, args.deadline)

    import torch

    from slimexport.api import compress
    from slimexport.config import AllocConfig, CalibConfig, CompressConfig
    from slimexport.models import load_model

    cuda = torch.cuda.is_available()
    model = "sd14" if cuda else "tiny"
    rec.data["env"] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "model": model,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
    }
    print(json.dumps(rec.data["env"]), flush=True)
    t = time.perf_counter()
    bundle = load_model(model, random_weights=(model == "sd14"))
    rec.data["load_seconds"] = round(time.perf_counter() - t, 2)
    work = Path(os.environ.get("DEVCHECK_WORK", "/tmp/slimexport-devcheck"))  # fixed: a rerun on the same machine reuses the compress stages
    size = 512 if cuda else None
    calib = CalibConfig(num_prompts=args.prompts if cuda else 2, num_steps=args.steps if cuda else 2,
                        num_bins=min(args.steps, args.bins) if cuda else 2, batch_size=args.prompts if cuda else 2,
                        height=size, width=size)
    base = CompressConfig(model=model, random_weights=(model == "sd14"), device="auto", calib=calib)
    results = {}

    def run_compress(name: str, alloc: AllocConfig) -> dict:
        res = compress(base.replace(alloc=alloc), out=work / name, bundle=bundle, cache_dir=work / "cache", progress=False)
        results[name] = res
        st = {k: {"seconds": round(v.seconds, 2), "cached": v.cached, "peak_mb": v.peak_memory_mb} for k, v in res.stages.items()}
        from slimexport.calibrate import CalibStats

        meta = CalibStats.load(res.stats_dir).meta
        out = {"stages": st, "params": res.plan["params"], "macs": res.plan.get("macs"),
               "calib": {k: meta.get(k) for k in ("image_evals", "image_evals_per_s", "seconds", "peak_gpu_bytes", "stats_bytes")}}
        for k, v in st.items():
            print(f"  {name:8s} {k:10s} {v['seconds']:7.2f} s cached={v['cached']} peak={v['peak_mb']} MB", flush=True)
        p = res.plan["params"]
        print(f"  {name:8s} UNet params {p['dense_total']:,} -> {p['slim_total']:,} ({p['slim_total'] / p['dense_total']:.3f})", flush=True)
        return out

    rec.section("compress", run_compress, "attnffn", AllocConfig(budget=0.73))

    def hooks() -> dict:
        from slimexport.calibrate.api import select_prompts
        from slimexport.calibrate.runner import denoise, initial_latents
        from slimexport.models.bundle import converted_copy

        dev = torch.device("cuda" if cuda else "cpu")
        dt = torch.float16 if cuda else torch.float32
        unet = converted_copy(bundle.unet, dev, dt)
        prompts = select_prompts(bundle, calib)
        cond = bundle.encoder.encode(prompts)[0].to(dev, dt)
        uncond = bundle.encoder.encode([""] * len(prompts))[0].to(dev, dt)
        h, w = bundle.latent_size(calib.height, calib.width)
        times = []
        for _ in range(2):  # first run warms up cuDNN/cuBLAS
            sched = bundle.make_scheduler()
            lat = initial_latents(list(range(len(prompts))), (4, h, w), dev, dt, sched.init_noise_sigma)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            denoise(unet, sched, cond, uncond, lat, calib.num_steps, calib.guidance_scale)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del unet
        evals = len(prompts) * calib.num_steps * 2
        hooked = rec.data["sections"].get("compress", {}).get("calib", {}).get("image_evals_per_s")
        plain = evals / times[-1]
        row = {"plain_seconds": times[-1], "plain_image_evals_per_s": plain, "hooked_image_evals_per_s": hooked,
               "overhead_ratio": (plain / hooked) if hooked else None}
        print(f"  plain {plain:.1f} img-evals/s, with hooks {hooked} img-evals/s, ratio {row['overhead_ratio']}", flush=True)
        return row

    rec.section("resnet", run_compress, "resnet", AllocConfig(budget=0.73, scope="unet", targets=("attn", "ffn", "resnet")))

    engines = {}

    def speed(pairs: list[tuple[str, int, int, int]]) -> dict:
        from slimexport.bench.timing import compare_speed
        from slimexport.engines.base import EngineConfig, io_spec_for_unet, make_feeds
        from slimexport.engines.torch_runner import TorchEngine

        ecfg = EngineConfig(device="cuda", dtype="fp16", channels_last=True, cuda_graphs=True) if cuda else EngineConfig()
        if "dense" not in engines:
            engines["dense"] = TorchEngine(bundle.unet, ecfg)
        rows = []
        for name, b, h, w in pairs:
            if name not in results:
                continue
            if rec.elapsed() > rec.deadline + 60:
                print(f"  {name} batch {b} {h}x{w}: skipped (time)", flush=True)
                continue
            if name not in engines:
                engines[name] = TorchEngine(results[name].load_slim(), ecfg)
            feeds = make_feeds(io_spec_for_unet(bundle.unet, dtype=ecfg.dtype), b, h, w)
            r = compare_speed(engines["dense"], engines[name], feeds, warmup=5, iterations=args.iterations if cuda else 5)
            row = {"model": name, "batch": b, "latent": [h, w], "dense_p50": r["dense_ms"]["p50"], "slim_p50": r["slim_ms"]["p50"],
                   "dense_p90": r["dense_ms"]["p90"], "slim_p90": r["slim_ms"]["p90"], "speedup": r["speedup"]}
            rows.append(row)
            print(f"  {name:8s} batch {b} {h}x{w}: dense {row['dense_p50']:.3f} ms, slim {row['slim_p50']:.3f} ms, "
                  f"speed-up {row['speedup']:.3f}x", flush=True)
        return {"rows": rows, "iterations": args.iterations if cuda else 5,
                "mode": "fp16 channels_last CUDA graphs, interleaved ABBA" if cuda else "fp32 eager CPU"}

    side = 64 if cuda else 16
    core = [(m, b, side, side) for b in (2, 8) for m in ("attnffn", "resnet")]
    extra = [("attnffn", 1, side, side), ("attnffn", 2, side * 3 // 2, side * 3 // 2), ("attnffn", 2, side * 2, side * 2)]
    rec.section("speed", speed, core)
    rec.section("hooks", hooks)
    rec.section("speed_extra", speed, extra)
    for e in engines.values():
        e.close()
    if args.kernels:
        def kernels() -> dict:
            p = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "bench_kernels.py"), "--json",
                                str(out_dir / "kernels.json")], capture_output=True, text=True, timeout=240)
            print(p.stdout[-6000:], flush=True)
            return {"returncode": p.returncode}

        rec.section("kernels", kernels)
    if args.onnx:
        def onnx_check() -> dict:
            from slimexport.engines.base import EngineConfig, build_engine, make_feeds
            from slimexport.engines.onnx_export import export_unet_onnx
            from slimexport.verify.metrics import compare
            from slimexport.verify.parity import torch_eps

            slim = results["attnffn"].load_slim()
            r = export_unet_onnx(slim, work / "onnx_slim", sample_shape=(2, 4, 32, 32))
            eng = build_engine("onnxruntime", r.folder, EngineConfig(device="cpu"))
            feeds = make_feeds(eng.io_spec, 2, 32, 32)
            m = compare(eng.run(feeds)["latent"], torch_eps(slim, feeds), "fp32")
            print(f"  ONNX slim export {r.export_seconds:.1f} s, {r.size_bytes / 2**20:.0f} MB; ORT vs torch max abs "
                  f"{m['max_abs']:.3g}, passed={m['passed']}", flush=True)
            return {"export_seconds": r.export_seconds, "size_bytes": r.size_bytes, "max_abs": m["max_abs"], "passed": m["passed"]}

        rec.section("onnx", onnx_check)
    rec.data["total_seconds"] = round(rec.elapsed(), 1)
    rec.save()
    print(f"wrote {rec.path} after {rec.elapsed():.1f} s", flush=True)


if __name__ == "__main__":
    main()
