"""One GPU check anyone can rerun: compress SD1.4 (random weights), time dense vs slim, calibration throughput.

    OUT=/tmp/out python tools/device_check.py [--groups main,aoti] [--deadline 240] [--prompts 8 --steps 4]
                                              [--no-kernels] [--no-onnx] [--variants ...] [--sections ...]

(``tools/device_check.py`` and ``python -m slimexport.harness.device_check`` are the same command;
``tools/device_check.sh`` installs carried wheels first on machines without a package registry.)

The defaults are the scale issue's check, sized to finish in about 5 minutes on an H100/H200: compress (attn,ffn at
0.73), speed, hooks, speed_extra, kernels, onnx.

Sections (each prints rows as measured and rewrites $OUT/device_check.json; a failing section is recorded
and the next one runs; sections that would start after --deadline seconds are skipped and say so).
Group ``main``:

1. ``compress``: ``sd14 --random-weights`` at budget 0.73 (attn,ffn) with a small calibration on the GPU
   (fp16 UNet, fp32 statistics): stage times, image-evaluations/s, peak GPU memory, MADAC seconds.
2. Variants from the same statistics (``--variants``, none by default): ``resnet`` (attn,ffn,resnet at a whole-UNet *parameter* budget of 0.73),
   ``resnet_macs`` / ``resnet_macs60`` (the same at whole-UNet *MAC* budgets 0.73 / 0.6), ``proj`` (attn,ffn,proj
   at 0.73 of the targeted parameters).
3. ``speed``: dense vs each slim UNet, fp16, channels_last, CUDA graphs, interleaved, UNet batch 2 and 8 at 64×64;
   the slim UNets run PyTorch's kernels by default (``--speed-kernels auto`` selects Triton dispatch AUTO, which
   autotunes each new shape: 36 s per row on the H200 in run4 against 15 s with PyTorch's in run5; in run7 AUTO
   kept PyTorch's kernels for every slim-UNet shape).
4. ``kernels_e2e`` (not by default): each slim UNet with the Triton kernels (dispatch AUTO) against the same UNet with
   PyTorch's (``force_kernels("torch")``), and with SDPA on q/k/v padded to one head size
   (``force_kernels("torch", sdpa_pad=True)``), same settings, at the speed section's batches.
5. ``hooks``: steady-state calibration throughput with and without the statistics hooks (a second, warm run
   of 16 prompts x 10 steps each), extrapolated to the full SlimSet (500 prompts x 25 steps x CFG); the same run
   without the covariance products, and (``--profile-hooks``) a torch.profiler table of 2 hooked steps.
6. ``speed_extra``: batch 1 (64×64) and batch 2 at 96×96 / 128×128.
7. ``kernels``: the kernel benchmarks (:mod:`slimexport.bench.kernel_bench`, in a child process).  8. ``onnx``: slim UNet export at 32×32, ORT-CPU check, in a CPU-only
   worker process on 4 cores started right after compress, beside the GPU sections (``--no-kernels``, ``--no-onnx``
   leave them out).

Group ``aoti``: AOTInductor packages (fp16, batch 2..8 at 64×64) of the dense UNet, the 0.73 slim UNet and a
deeper (0.5) slim UNet, compiled in parallel worker processes: export and compile seconds; then, in a fresh
worker process, dense vs slim latency at batch 2 and 8.

Without CUDA it degrades to a smoke run on the ``tiny`` model (seconds), so it can be tested anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ONNX_WORKER_THREADS = 4  # the ONNX check's CPU threads, beside the GPU sections
SELF = "slimexport.harness.device_check"  # worker processes run this module


def child_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` in a child process that imports this very slimexport (the folder holding the
    package goes first on its PYTHONPATH: a checkout that is not installed works too)."""
    return [sys.executable, "-W", "ignore", "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    import slimexport

    here = str(Path(slimexport.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def worker_output(text: str) -> tuple[list[dict], list[str]]:
    """A worker process's output: its JSON records (lines starting with ``{``) and its other lines."""
    lines = text.strip().splitlines()
    return [json.loads(ln) for ln in lines if ln.startswith("{")], [ln for ln in lines if not ln.startswith("{")]


def worker_failure(what: str, returncode: int, log_lines: list[str]) -> dict:
    return {"error": f"{what} exit {returncode}", "tail": log_lines[-40:]}


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

    def section(self, name: str, fn, *args, force: bool = False) -> None:
        """Run ``fn(*args)`` and record its dict; skipped after the deadline unless ``force`` (a job already running)."""
        if self.elapsed() > self.deadline and not force:
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


def main(argv: list[str] | None = None) -> None:
    """The command line (``tools/device_check.py``)."""
    faulthandler.enable()  # a crash in native code (a package loader, a kernel) prints the Python stack
    ap = argparse.ArgumentParser(prog="device_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadline", type=float, default=240.0, help="start no section after this many seconds")
    ap.add_argument("--groups", default="main", help="comma-separated: main, aoti")
    ap.add_argument("--variants", default="",
                    help="slim variants compressed besides attnffn (main group): resnet,resnet_macs,resnet_macs60,proj")
    ap.add_argument("--sections", default="speed,hooks,speed_extra",
                    help="main-group sections to run, in this order (also: kernels_e2e)")
    ap.add_argument("--core-batches", default="2,8", help="UNet batches of the speed and kernels_e2e sections")
    ap.add_argument("--speed-kernels", default="torch", choices=("auto", "torch"),
                    help="kernel dispatch of the slim UNets in the speed sections (default torch: PyTorch's kernels, no "
                         "Triton autotuning per new shape; kernels_e2e compares AUTO with them)")
    ap.add_argument("--aoti-worker", nargs=2, metavar=("NAME", "SOURCE"),
                    help="internal: compile one AOTInductor package (SOURCE: 'dense' or a slim UNet folder), print its record")
    ap.add_argument("--onnx-worker", metavar="SLIM_DIR", help="internal: export the slim UNet at 32x32, check it with ORT-CPU")
    ap.add_argument("--aoti-speed-worker", metavar="PACKAGES_JSON",
                    help="internal: load the packages {name: path} (one named 'dense') and time dense vs each, print rows")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bins", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="run the kernel benchmarks (python -m slimexport.bench.kernel_bench)")
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="export at 32x32, ORT-CPU check")
    ap.add_argument("--profile-hooks", action="store_true", help="hooks section: also a torch.profiler table of 2 steps")
    args = ap.parse_args(argv)
    if args.aoti_worker:
        return aoti_worker(*args.aoti_worker)
    if args.aoti_speed_worker:
        return aoti_speed_worker(json.loads(args.aoti_speed_worker), args.iterations)
    if args.onnx_worker:
        return onnx_worker(Path(args.onnx_worker))
    groups = set(args.groups.split(","))
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out_dir, args.deadline)
    if groups != {"main"}:
        rec.path = out_dir / f"device_check_{'_'.join(sorted(groups))}.json"
    rec.data["groups"] = sorted(groups)

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

    unet_macs = AllocConfig(budget=0.73, scope="unet", targets=("attn", "ffn", "resnet"), metric="macs")
    variants = {
        "attnffn": AllocConfig(budget=0.73),
        "resnet": AllocConfig(budget=0.73, scope="unet", targets=("attn", "ffn", "resnet")),
        "resnet_macs": unet_macs,
        "resnet_macs60": unet_macs.replace(budget=0.6),
        "proj": AllocConfig(budget=0.73, targets=("attn", "ffn", "proj")),
        "deep50": AllocConfig(budget=0.5),
    }
    wanted = ["attnffn"] + [v for v in args.variants.split(",") if v] if "main" in groups else []
    if "aoti" in groups:
        wanted += [n for n in ("attnffn", "deep50") if n not in wanted]
    rec.section("compress", run_compress, "attnffn", variants["attnffn"])
    for name in wanted[1:]:
        rec.section(name, run_compress, name, variants[name])
    onnx_job = None
    if args.onnx and "main" in groups and "attnffn" in results:
        # CPU-only work (export, ORT-CPU): it runs beside the GPU sections on a few cores, in a process that sees no GPU.
        env = child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(ONNX_WORKER_THREADS))
        onnx_job = (time.perf_counter(), subprocess.Popen(
            child_command(SELF, "--onnx-worker", str(results["attnffn"].slim_dir.resolve())),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))

    def hooks() -> dict:
        from slimexport.calibrate import calibrate, select_prompts
        from slimexport.calibrate.runner import denoise, initial_latents
        from slimexport.models.bundle import converted_copy

        dev = torch.device("cuda" if cuda else "cpu")
        dt = torch.float16 if cuda else torch.float32
        hc = calib.replace(num_prompts=16 if cuda else 2, num_steps=10 if cuda else 2, num_bins=5 if cuda else 2,
                           batch_size=16 if cuda else 2)
        prompts = select_prompts(bundle, hc, device=dev)
        evals = len(prompts) * hc.num_steps * 2
        hooked = []
        for _ in range(2):  # the first run warms up cuDNN/cuBLAS and the kernel choices
            st = calibrate(bundle, prompts, hc, device=dev, dtype=dt, progress=False)
            hooked.append(st.meta)
            del st
        unet = converted_copy(bundle.unet, dev, dt)
        cond = bundle.encoder.encode(prompts)[0].to(dev, dt)
        uncond = bundle.encoder.encode([""] * len(prompts))[0].to(dev, dt)
        h, w = bundle.latent_size(hc.height, hc.width)
        times = []
        for _ in range(2):
            sched = bundle.make_scheduler()
            lat = initial_latents(list(range(len(prompts))), (4, h, w), dev, dt, sched.init_noise_sigma)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            denoise(unet, sched, cond, uncond, lat, hc.num_steps, hc.guidance_scale)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del unet
        plain = evals / times[-1]
        hook_rate = hooked[-1]["image_evals_per_s"]
        full = 500 * 25 * 2
        row = {"prompts": len(prompts), "steps": hc.num_steps, "bins": hc.num_bins, "batch": hc.batch_size, "image_evals": evals,
               "plain_seconds": times[-1], "plain_image_evals_per_s": plain, "hooked_seconds": hooked[-1]["seconds"],
               "hooked_loop_seconds": hooked[-1].get("loop_seconds"), "finalize_seconds": hooked[-1].get("finalize_seconds"),
               "hooked_image_evals_per_s": hook_rate, "overhead_ratio": plain / hook_rate,
               "first_hooked_image_evals_per_s": hooked[0]["image_evals_per_s"],
               "peak_gpu_bytes": hooked[-1].get("peak_gpu_bytes"), "stats_bytes": hooked[-1].get("stats_bytes"),
               "extrapolated_full_slimset_seconds": full / hook_rate, "extrapolated_full_plain_seconds": full / plain}
        print(f"  {evals} image-evals: plain {plain:.1f}/s, with hooks {hook_rate:.1f}/s (first run {hooked[0]['image_evals_per_s']:.1f}/s),"
              f" overhead {row['overhead_ratio']:.2f}x (finalize {row['finalize_seconds']:.1f} s excluded); 500x25xCFG extrapolated {full / hook_rate:.0f} s hooked,"
              f" {full / plain:.0f} s plain; peak {row['peak_gpu_bytes']} B, stats {row['stats_bytes']} B", flush=True)
        row.update(hooks_attribution(prompts, hc, dev, dt, args.profile_hooks))
        return row

    def hooks_attribution(prompts, hc, dev, dt, with_profile: bool) -> dict:
        """Where the hooks' time goes: the same hooked run without the covariance products (hooks and scalars
        only), the implementation AUTO picked per covariance shape, and a profile of 2 hooked steps."""
        from slimexport.calibrate import calibrate
        from slimexport.kernels import choices

        st = calibrate(bundle, prompts, hc, device=dev, dtype=dt, progress=False, accumulate=lambda acc, x: None)
        out = {"scalars_only_image_evals_per_s": st.meta["image_evals_per_s"]}
        del st
        picked = [v.value for k, v in choices().items() if str(k[0]) == "cov_accumulate"]
        out["cov_choices"] = {v: picked.count(v) for v in set(picked)}
        print(f"  hooks without the covariance products: {out['scalars_only_image_evals_per_s']:.1f} image-evals/s; "
              f"cov_accumulate AUTO choices {out['cov_choices']}", flush=True)
        if not with_profile:
            return out
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            calibrate(bundle, prompts, hc.replace(num_steps=2, num_bins=2), device=dev, dtype=dt, progress=False)
        ka = prof.key_averages()
        dev_key = "self_device_time_total" if cuda else "self_cpu_time_total"
        out["profile_self_device_ms"] = sum(getattr(e, dev_key, 0) for e in ka) / 1e3
        out["profile_top"] = [{"name": e.key[:80], "calls": e.count, "self_device_ms": getattr(e, dev_key, 0) / 1e3,
                               "self_cpu_ms": e.self_cpu_time_total / 1e3}
                              for e in sorted(ka, key=lambda e: -getattr(e, dev_key, 0))[:15]]
        table = ka.table(sort_by=dev_key, row_limit=25) + "\n\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25)
        (out_dir / "hooks_profile.txt").write_text(table)
        print(f"  profile of 2 hooked steps ({len(prompts)} prompts, CFG): self device time {out['profile_self_device_ms']:.1f} ms in all", flush=True)
        for r in out["profile_top"][:10]:
            print(f"    {r['self_device_ms']:9.2f} ms {r['calls']:6d} calls  {r['name']}", flush=True)
        return out

    engines = {}

    def engine_cfg():
        from slimexport.engines.base import EngineConfig

        return EngineConfig(device="cuda", dtype="fp16", channels_last=True, cuda_graphs=True) if cuda else EngineConfig()

    def speed(pairs: list[tuple[str, int, int, int]]) -> dict:
        from slimexport.bench.timing import compare_speed
        from slimexport.engines.base import io_spec_for_unet, make_feeds
        from slimexport.engines.torch_runner import TorchEngine

        cfg = engine_cfg()
        if "dense" not in engines:
            engines["dense"] = TorchEngine(bundle.unet, cfg)
        rows = []
        for name, b, h, w in pairs:
            if name not in results:
                continue
            if rec.elapsed() > rec.deadline + 60:
                print(f"  {name} batch {b} {h}x{w}: skipped (time)", flush=True)
                continue
            if name not in engines:
                engines[name] = TorchEngine(results[name].load_slim(), cfg)
            feeds = make_feeds(io_spec_for_unet(bundle.unet, dtype=cfg.dtype), b, h, w)
            r = compare_speed(engines["dense"], engines[name], feeds, warmup=5, iterations=args.iterations if cuda else 5)
            row = speed_row(r, model=name, batch=b, latent=[h, w], params=results[name].plan["params"]["slim_total"])
            rows.append(row)
            print(f"  {name:13s} batch {b} {h}x{w}: {speed_line(row)}", flush=True)
        return {"rows": rows, "iterations": args.iterations if cuda else 5,
                "mode": "fp16 channels_last CUDA graphs, interleaved ABBA" if cuda else "fp32 eager CPU"}

    def kernels_e2e(names: list[str], batches: tuple[int, ...]) -> dict:
        """Slim UNet with Triton kernels (AUTO) vs the same UNet with PyTorch's kernels (graphs capture the choice)."""
        from slimexport.bench.timing import compare_speed
        from slimexport.engines.base import io_spec_for_unet, make_feeds
        from slimexport.engines.torch_runner import TorchEngine
        from slimexport.kernels import choices, clear_choices, force_kernels

        cfg = engine_cfg()
        rows = []
        for name in names:
            if name not in results:
                continue
            slim = results[name].load_slim()
            for b in batches:
                feeds = make_feeds(io_spec_for_unet(bundle.unet, dtype=cfg.dtype), b, side, side)
                with force_kernels("torch"):
                    off = TorchEngine(slim, cfg)
                    off.prepare(feeds)  # captures the graph with the torch references
                clear_choices()
                on = TorchEngine(slim, cfg)
                on.prepare(feeds)  # warm-up calls measure each shape once (AUTO), the graph keeps the choice
                picked = {str(k[0]): 0 for k in choices()}
                n_triton = 0
                for k, v in choices().items():
                    if v.value == "triton":
                        picked[str(k[0])] += 1
                        n_triton += 1
                r = compare_speed(off, on, feeds, warmup=5, iterations=args.iterations if cuda else 5)
                with force_kernels("torch", sdpa_pad=True):
                    padded = TorchEngine(slim, cfg)
                    padded.prepare(feeds)  # SDPA with q/k/v padded to one head size (flash kernels instead of memory-efficient)
                rp = compare_speed(off, padded, feeds, warmup=5, iterations=args.iterations if cuda else 5)
                row = {"model": name, "batch": b, "torch_p50": r["dense_ms"]["p50"], "kernels_p50": r["slim_ms"]["p50"],
                       "speedup": r["speedup"], "shapes_measured": len(choices()), "triton_chosen": picked,
                       "padded_sdpa_p50": rp["slim_ms"]["p50"], "padded_speedup": rp["speedup"]}
                rows.append(row)
                print(f"  {name:13s} batch {b}: kernels off {row['torch_p50']:.3f} ms, on {row['kernels_p50']:.3f} ms, "
                      f"{row['speedup']:.3f}x; Triton chosen for {n_triton}/{len(choices())} shapes {picked}; "
                      f"padded SDPA {row['padded_sdpa_p50']:.3f} ms ({rp['speedup']:.3f}x vs off)", flush=True)
                off.close()
                on.close()
                padded.close()
        return {"rows": rows}

    side = 64 if cuda else 16
    def with_kernels(fn):
        def run(*a):
            from slimexport.kernels import force_kernels

            with force_kernels("torch" if args.speed_kernels == "torch" else None):
                return {**fn(*a), "slim_kernels": args.speed_kernels}

        return run

    if "main" in groups:
        batches = [int(b) for b in args.core_batches.split(",")]
        core = [(m, b, side, side) for b in batches for m in ("attnffn", "resnet", "resnet_macs", "resnet_macs60", "proj")]
        extra = [(m, 1, side, side) for m in ("attnffn", "resnet_macs")]
        extra += [(m, 2, side * k // 2, side * k // 2) for k in (3, 4) for m in ("attnffn", "resnet_macs")]
        plan = {"speed": (with_kernels(speed), core), "kernels_e2e": (kernels_e2e, ["attnffn", "proj"], tuple(batches)),
                "hooks": (hooks,), "speed_extra": (with_kernels(speed), extra)}
        for sec in args.sections.split(","):
            rec.section(sec, *plan[sec])
    for e in engines.values():
        e.close()
    engines.clear()
    if args.kernels and "main" in groups:
        def kernels() -> dict:
            p = subprocess.run(child_command("slimexport.bench.kernel_bench", "--json", str(out_dir.resolve() / "kernels.json")),
                               capture_output=True, text=True, timeout=240, env=child_env())
            print(p.stdout[-6000:], flush=True)
            return {"returncode": p.returncode}

        rec.section("kernels", kernels)
    if args.onnx and "main" in groups:
        def onnx_wait() -> dict:
            if onnx_job is None:
                return {"error": "no slim UNet to export"}
            started, proc = onnx_job
            records, log_lines = worker_output(proc.communicate(timeout=600)[0])
            print("\n".join(f"  {ln}" for ln in log_lines[-6:]), flush=True)
            if proc.returncode != 0 or not records:
                return worker_failure("onnx worker", proc.returncode, log_lines)
            return {**records[-1], "worker_seconds": round(time.perf_counter() - started, 1),
                    "threads": ONNX_WORKER_THREADS, "ran_beside_gpu_sections": True}

        rec.section("onnx", onnx_wait, force=True)  # started after compress: only waits for it
    if "aoti" in groups:
        packages = {}

        def aoti_build(names: list[str]) -> dict:
            """Compile the packages in parallel worker processes (inductor's lowering is mostly single-threaded)."""
            procs = {}
            for name in names:
                src = "dense" if name == "dense" else str(results[name].slim_dir)
                procs[name] = subprocess.Popen(child_command(SELF, "--aoti-worker", name, src), env=child_env(),
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            rows = {}
            for name, p in procs.items():
                records, log_lines = worker_output(p.communicate(timeout=540)[0])
                print("\n".join(f"  [{name}] {ln}" for ln in log_lines[-8:]), flush=True)
                if p.returncode != 0 or not records:
                    rows[name] = worker_failure("compile worker", p.returncode, log_lines)
                    continue
                row = rows[name] = records[-1]
                packages[name] = row["package_path"]
                print(f"  aoti {name}: export {row['export_seconds']} s, compile {row['compile_seconds']} s, "
                      f"{row['package_bytes'] / 2**20:.0f} MB, reused={row['reused']}", flush=True)
            return {"packages": rows, "parallel_workers": len(procs)}

        def aoti_speed() -> dict:
            """Load and time the packages in a fresh process: a crash while loading (seen once on the H200, in the
            process that had compressed the models) is reported with its stack, not fatal to the check."""
            if "dense" not in packages or len(packages) < 2:
                return {"rows": [], "error": f"packages missing: have {sorted(packages)}"}
            p = subprocess.run(child_command(SELF, "--aoti-speed-worker", json.dumps(packages),
                                             "--iterations", str(args.iterations if cuda else 5)), env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
            rows, log_lines = worker_output(p.stdout)
            print("\n".join(f"  {ln}" for ln in log_lines), flush=True)
            failure = worker_failure("speed worker", p.returncode, log_lines) if p.returncode != 0 else {}
            return {"rows": rows, "worker_exit": p.returncode, **failure}

        rec.section("aoti_build", aoti_build, ["dense"] + [n for n in ("attnffn", "deep50") if n in results])
        # Not subject to --deadline: the deadline keeps the compile from starting late; once packages exist,
        # timing them is what the group is for (seconds, after minutes of compiling).
        rec.section("aoti_speed", aoti_speed, force=bool(packages))
    rec.data["total_seconds"] = round(rec.elapsed(), 1)
    rec.save()
    print(f"wrote {rec.path} after {rec.elapsed():.1f} s", flush=True)


def aoti_profile(cuda: bool):
    from slimexport.engines.base import EngineProfile

    side = 64 if cuda else 16
    return EngineProfile(min_batch=2, opt_batch=2, max_batch=8, min_height=side, opt_height=side, max_height=side,
                         min_width=side, opt_width=side, max_width=side)


def speed_row(r: dict, **what) -> dict:
    """One speed row of a :func:`compare_speed` result: p50/p90 of both models, the speed-up and its interval."""
    return {**what, "dense_p50": r["dense_ms"]["p50"], "slim_p50": r["slim_ms"]["p50"], "dense_p90": r["dense_ms"]["p90"],
            "slim_p90": r["slim_ms"]["p90"], "speedup": r["speedup"], "speedup_ci95": r["speedup_ci95"]}


def speed_line(row: dict) -> str:
    from slimexport.report import speedup_text

    return f"dense {row['dense_p50']:.3f} ms, slim {row['slim_p50']:.3f} ms, speed-up {speedup_text(row, 'x')}"


def onnx_worker(slim_dir: Path) -> None:
    """Export the slim UNet at 32×32 (fp32, CPU), run it with ONNX Runtime on the CPU, compare with torch; print the
    record as the last line (JSON)."""
    import torch

    from slimexport.engines.base import EngineConfig, build_engine, make_feeds
    from slimexport.engines.onnx_export import export_unet_onnx
    from slimexport.slim.apply import load_slim_unet
    from slimexport.verify.metrics import compare
    from slimexport.verify.parity import torch_eps

    torch.set_num_threads(ONNX_WORKER_THREADS)
    work = Path(os.environ.get("DEVCHECK_WORK", "/tmp/slimexport-devcheck"))
    slim = load_slim_unet(slim_dir)
    r = export_unet_onnx(slim, work / "onnx_slim", sample_shape=(2, 4, 32, 32))
    eng = build_engine("onnxruntime", r.folder, EngineConfig(device="cpu", threads=ONNX_WORKER_THREADS))
    feeds = make_feeds(eng.io_spec, 2, 32, 32)
    m = compare(eng.run(feeds)["latent"], torch_eps(slim, feeds), "fp32")
    print(f"ONNX slim export {r.export_seconds:.1f} s, {r.size_bytes / 2**20:.0f} MB; ORT vs torch max abs "
          f"{m['max_abs']:.3g}, passed={m['passed']}", flush=True)
    print(json.dumps({"export_seconds": r.export_seconds, "size_bytes": r.size_bytes, "max_abs": m["max_abs"],
                      "passed": m["passed"]}), flush=True)


def aoti_speed_worker(packages: dict[str, str], iterations: int) -> None:
    """Load the packages (fresh process) and time dense vs each slim one at UNet batch 2 and 8; a JSON line per row."""
    faulthandler.enable()
    import torch

    from slimexport.bench.timing import compare_speed
    from slimexport.engines.aoti import AotiEngine
    from slimexport.engines.base import EngineConfig, make_feeds

    cuda = torch.cuda.is_available()
    side = 64 if cuda else 16
    engines = {}
    for name, path in packages.items():
        print(f"loading aoti {name}: {path}", flush=True)
        t = time.perf_counter()
        engines[name] = AotiEngine(path, EngineConfig(device="cuda" if cuda else "cpu", dtype="fp16" if cuda else "fp32",
                                                      profile=aoti_profile(cuda)))
        print(f"loaded aoti {name} in {time.perf_counter() - t:.1f} s", flush=True)
    for name in (n for n in packages if n != "dense"):
        for b in (2, 8):
            feeds = make_feeds(engines["dense"].io_spec, b, side, side)
            r = compare_speed(engines["dense"], engines[name], feeds, warmup=5, iterations=iterations)
            row = speed_row(r, model=name, batch=b)
            print(f"aoti {name:8s} batch {b}: {speed_line(row)}", flush=True)
            print(json.dumps(row), flush=True)
    for e in engines.values():
        e.close()


def aoti_worker(name: str, source: str) -> None:
    """Compile one package into the work folder and print its record as the last line (JSON)."""
    faulthandler.enable()
    import torch

    from slimexport.engines.aoti import build_aoti_package

    cuda = torch.cuda.is_available()
    if source == "dense":
        from slimexport.models import load_model

        model = load_model("sd14" if cuda else "tiny", random_weights=cuda).unet
    else:
        from slimexport.slim.apply import load_slim_unet

        model = load_slim_unet(source)
    work = Path(os.environ.get("DEVCHECK_WORK", "/tmp/slimexport-devcheck"))
    dt = "fp16" if cuda else "fp32"
    t = time.perf_counter()
    res = build_aoti_package(model, work / f"aoti_{name}", aoti_profile(cuda), dtype=dt, device="cuda" if cuda else "cpu")
    sc = res.sidecar
    print(json.dumps({"reused": res.reused, "export_seconds": sc.get("export_seconds"), "compile_seconds": sc.get("compile_seconds"),
                      "worker_seconds": round(time.perf_counter() - t, 1), "package_bytes": res.package.stat().st_size,
                      "package_path": str(res.package), "dtype": dt}), flush=True)


if __name__ == "__main__":
    main()
