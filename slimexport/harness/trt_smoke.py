"""The TensorRT checks to run first on any machine that has TensorRT and a GPU, in order.

    python tools/trt_smoke.py [--out DIR]

slimexport's TensorRT backend has been read against TensorRT's and Polygraphy's documentation but never run;
this script is its first contact. On the ``tiny`` UNet (seconds per step on a GPU):

 1. versions      Python, torch, onnx, onnxruntime, Polygraphy (floor for TensorRT 11), TensorRT, the GPUs
 2. libcudart     the CUDA runtime Polygraphy's CUDA wrapper will load (or the fix when it would find none)
 3. export        fp32 and fp16 ONNX exports; the timestep on its own axis (Bt: 1 or 2B)
 4. onnxruntime   both exports on ONNX Runtime (CPU): timestep [1] and [2B] agree, and match PyTorch
 5. profile       the optimization profile shapes built from the sidecar's I/O spec (timestep 1..max batch)
 6. parse         TensorRT's ONNX parser, strongly typed, on both exports
 7. build         fp16 and fp32 engines at a tiny profile
 8. io            each engine's I/O names, dtypes and profile shapes against its sidecar
 9. run           min, opt, max and a non-square shape, timestep [2B] and [1] (float32 and the sample's dtype),
                  against fp32 PyTorch within the fp16 tolerance
10. refused       a shape outside the profile: refused by slimexport's check, and by TensorRT as a one-line error
11. reuse         a second build of the same export reuses the engine
12. timing cache  a rebuild reads the timing cache and replaces it (no .lock file beside it)
13. cuda:1        build and run on the second GPU, when there is one

Without TensorRT or a CUDA GPU it runs checks 1-5, says what it could not check, and exits 0. Otherwise it stops
at the first failure and exits 1. Each line is ``PASS|FAIL|SKIP <check>: <detail>``; ``$OUT/trt_smoke.json``
(``--out``) keeps them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from slimexport.engines import tensorrt as trtmod
from slimexport.engines.base import EngineConfig, EngineProfile, make_feeds
from slimexport.errors import SlimExportError, UsageError

# tiny downsamples by 2: latent sizes are multiples of 2; batch 1..4 UNet rows
PROFILE = EngineProfile(1, 2, 4, 8, 16, 32, 8, 16, 32, latent_multiple=2)
NON_SQUARE = (3, 8, 24)  # (2B, H, W)
TIMESTEP = 981.0  # an integer step: exact in float16 too


class Skip(Exception):
    """The check cannot run here (said why); not a failure."""


class Smoke:
    def __init__(self, out: Path):
        self.out = out
        self.have_trt = importlib.util.find_spec("tensorrt") is not None
        self.have_gpu = torch.cuda.is_available()
        self.results: list[dict] = []
        self.exports: dict = {}
        self.builds: dict = {}

    def need_trt(self) -> None:
        if not self.have_trt:
            raise Skip("TensorRT is not installed")
        if not self.have_gpu:
            raise Skip("PyTorch sees no CUDA GPU")

    # ------------------------------------------------------------ checks that run anywhere

    def versions(self) -> str:
        import onnx
        import onnxruntime
        import polygraphy

        parts = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})",
                 f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}", f"polygraphy {polygraphy.__version__}"]
        if trtmod._version_tuple(polygraphy.__version__) < trtmod._version_tuple(trtmod.POLYGRAPHY_MIN):
            raise UsageError(f"polygraphy {polygraphy.__version__} is below slimexport's floor {trtmod.POLYGRAPHY_MIN}",
                             f"pip install -U 'polygraphy>={trtmod.POLYGRAPHY_MIN}'")
        if self.have_trt:
            import tensorrt

            trtmod.check_versions(tensorrt.__version__, polygraphy.__version__)
            parts.append(f"tensorrt {tensorrt.__version__}")
        else:
            parts.append("tensorrt not installed")
        if self.have_gpu:
            parts += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        return "; ".join(parts)

    def libcudart(self) -> str:
        try:
            found = trtmod.check_cudart()
        except UsageError as err:
            if self.have_trt:
                raise
            raise Skip(f"needed only with TensorRT; here: {err}") from err
        return f"Polygraphy will load {found}" if found else "not checked off Linux"

    def export(self) -> str:
        from slimexport.engines.onnx_export import export_unet_onnx
        from slimexport.models.load import build_unet
        from slimexport.models.registry import TINY_UNET

        self.unet = build_unet(TINY_UNET).eval()
        for dtype in ("fp32", "fp16"):
            res = export_unet_onnx(self.unet, self.out / f"onnx_{dtype}", dtype=dtype)
            ts = next(e for e in res.io_spec["inputs"] if e["name"] == "timestep")
            if ts["shape"] != ["Bt"] or ts.get("sizes") != {"Bt": [1, "2B"]}:
                raise AssertionError(f"{dtype} export: timestep entry {ts}, expected its own axis Bt (1 or 2B)")
            self.exports[dtype] = res
        return ", ".join(f"{k} {v.folder} ({v.export_seconds:.1f} s)" for k, v in self.exports.items())

    def reference(self, feeds: dict) -> np.ndarray:
        """fp32 PyTorch on the same (possibly fp16-valued) inputs; diffusers broadcasts a [1] timestep itself."""
        with torch.no_grad():
            return self.unet(torch.from_numpy(feeds["sample"]).float(), torch.from_numpy(feeds["timestep"]).float(),
                             torch.from_numpy(feeds["encoder_hidden_states"]).float(), return_dict=False)[0].numpy()

    def _timestep_variants(self, feeds: dict) -> dict[str, dict]:
        rows, act = feeds["sample"].shape[0], feeds["sample"].dtype
        out = {"[2B] float32": dict(feeds, timestep=np.full(rows, TIMESTEP, np.float32)),
               "[1] float32": dict(feeds, timestep=np.array([TIMESTEP], np.float32))}
        if act != np.float32:
            out[f"[1] {act}"] = dict(feeds, timestep=np.array([TIMESTEP], act))
        return out

    def _against_torch(self, engine, shapes, tol: str) -> list[str]:
        from slimexport.verify.metrics import compare

        lines = []
        for b, h, w in shapes:
            base = make_feeds(engine.io_spec, b, h, w, seed=b * 100 + h + w)
            for label, feeds in self._timestep_variants(base).items():
                got = engine.run(feeds)[engine.io_spec["outputs"][0]["name"]]
                m = compare(got, self.reference(feeds), tol)
                if not m["passed"]:
                    raise AssertionError(f"{engine.name} {b}x{h}x{w} timestep {label}: {m['reason']}")
                lines.append(f"{b}x{h}x{w} {label} cos {m['cosine']:.6f}")
        return lines

    def onnxruntime(self) -> str:
        from slimexport.engines.onnxruntime import OrtEngine

        lines = []
        for dtype, res in self.exports.items():
            with OrtEngine(res.folder, EngineConfig(threads=2)) as eng:
                lines += [f"{dtype} {x}" for x in self._against_torch(eng, [(2, 16, 16), NON_SQUARE], dtype)]
        return f"{len(lines)} runs agree ({lines[0]}, ...)"

    def profile(self) -> str:
        shapes = trtmod.profile_shapes(PROFILE, self.exports["fp16"].io_spec)
        want = {"sample": ((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32)), "timestep": ((1,), (2,), (4,)),
                "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (4, 77, 32))}
        if shapes != want:
            raise AssertionError(f"profile shapes {shapes}, expected {want}")
        return f"timestep {shapes['timestep']}"

    # ------------------------------------------------------------ checks that need TensorRT and a GPU

    def parse(self) -> str:
        self.need_trt()
        from polygraphy.backend.trt import network_from_onnx_path

        out = []
        for dtype, res in self.exports.items():
            with trtmod.polygraphy_errors(f"parse {res.onnx_path}", "see TensorRT's messages above"):
                builder, network, parser = network_from_onnx_path(str(res.onnx_path), strongly_typed=True)
            out.append(f"{dtype}: {network.num_layers} layers, {network.num_inputs} inputs")
            del builder, network, parser
        return "; ".join(out)

    def build(self) -> str:
        self.need_trt()
        for dtype, res in self.exports.items():
            t0 = time.perf_counter()
            self.builds[dtype] = trtmod.build_trt_engine(res.folder, self.out / f"trt_{dtype}", PROFILE,
                                                         cache_dir=self.out / "timing", rebuild=True)
            self.builds[dtype + "_seconds"] = time.perf_counter() - t0
        return ", ".join(f"{k} {self.builds[k].plan.name} ({self.builds[k + '_seconds']:.1f} s)" for k in self.exports)

    def io(self) -> str:
        self.need_trt()
        import tensorrt as trt

        for dtype in self.exports:
            res = self.builds[dtype]
            spec = res.sidecar["io_spec"]
            with trtmod._on_device(0):
                engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(res.plan.read_bytes())
                names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
                inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
                want_in = [e["name"] for e in spec["inputs"]]
                want_out = [e["name"] for e in spec["outputs"]]
                if inputs != want_in or [n for n in names if n not in inputs] != want_out:
                    raise AssertionError(f"{dtype}: engine I/O {names}, sidecar {want_in} -> {want_out}")
                for e in spec["inputs"] + spec["outputs"]:
                    got = np.dtype(trt.nptype(engine.get_tensor_dtype(e["name"]))).name
                    if got != e["dtype"]:
                        raise AssertionError(f"{dtype}: {e['name']} is {got} in the engine, {e['dtype']} in the sidecar")
                for name, (lo, opt, hi) in trtmod.profile_shapes(PROFILE, spec).items():
                    got = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
                    if got != (lo, opt, hi):
                        raise AssertionError(f"{dtype}: {name} profile {got} in the engine, {(lo, opt, hi)} expected")
        return "names, dtypes and profile shapes match the sidecars"

    def run(self) -> str:
        self.need_trt()
        shapes = [(PROFILE.min_batch, PROFILE.min_height, PROFILE.min_width),
                  (PROFILE.opt_batch, PROFILE.opt_height, PROFILE.opt_width),
                  (PROFILE.max_batch, PROFILE.max_height, PROFILE.max_width), NON_SQUARE]
        lines = []
        for dtype in self.exports:
            with trtmod.TrtEngine(self.builds[dtype].plan, EngineConfig(device="cuda")) as eng:
                lines += [f"{dtype} {x}" for x in self._against_torch(eng, shapes, "fp16")]
                staged = eng.prepare(make_feeds(eng.io_spec, 2, 16, 16, one_timestep=True))
                staged()
                torch.cuda.synchronize()
        return f"{len(lines)} runs within fp16 tolerance (worst first: {min(lines, key=lambda s: float(s.split()[-1]))})"

    def refused(self) -> str:
        self.need_trt()
        with trtmod.TrtEngine(self.builds["fp16"].plan, EngineConfig(device="cuda")) as eng:
            too_big = make_feeds(eng.io_spec, PROFILE.max_batch + 1, 16, 16)
            try:
                eng.run(too_big)
            except UsageError as err:
                ours = str(err)
            else:
                raise AssertionError("a batch above the profile was not refused by slimexport")
            try:
                eng._run(too_big)  # past slimexport's check: TensorRT's own refusal, as a one-line error
            except SlimExportError as err:
                theirs = str(err)
            else:
                raise AssertionError("TensorRT ran a batch above the profile")
        if "\n" in ours + theirs:
            raise AssertionError("an error message spans lines")
        return f"slimexport: {ours[:80]}...; TensorRT: {theirs[:120]}..."

    def reuse(self) -> str:
        self.need_trt()
        res = trtmod.build_trt_engine(self.exports["fp16"].folder, self.out / "trt_fp16", PROFILE, cache_dir=self.out / "timing")
        if not res.reused:
            raise AssertionError("the second build of the same export did not reuse the engine")
        return f"reused {res.plan.name}"

    def timing_cache(self) -> str:
        self.need_trt()
        cache_dir = self.out / "timing"
        caches = sorted(cache_dir.iterdir())
        if len(caches) != 1 or not caches[0].name.endswith(".cache") or caches[0].stat().st_size == 0:
            raise AssertionError(f"timing cache folder holds {[p.name for p in caches]}, expected one non-empty .cache")
        before = caches[0].stat().st_size
        t0 = time.perf_counter()
        trtmod.build_trt_engine(self.exports["fp16"].folder, self.out / "trt_fp16", PROFILE, cache_dir=cache_dir,
                                rebuild=True)
        seconds = time.perf_counter() - t0
        after = sorted(cache_dir.iterdir())
        if [p.name for p in after] != [caches[0].name]:
            raise AssertionError(f"after a rebuild the timing cache folder holds {[p.name for p in after]}")
        return (f"{caches[0].name}: {before} -> {after[0].stat().st_size} bytes; fp16 build {self.builds['fp16_seconds']:.1f} s "
                f"cold, {seconds:.1f} s with the cache")

    def cuda1(self) -> str:
        self.need_trt()
        if torch.cuda.device_count() < 2:
            raise Skip("one GPU only")
        import shutil

        from slimexport.engines.base import build_engine

        info = trtmod.current_device_info("cuda:1")
        folder = self.out / "onnx_fp16_cuda1"  # a copy: its engine is built beside it
        shutil.copytree(self.exports["fp16"].folder, folder, dirs_exist_ok=True)
        cfg = EngineConfig(device="cuda:1", profile=PROFILE)
        with build_engine("tensorrt", folder, cfg) as eng:
            if eng.device != "cuda:1":
                raise AssertionError(f"engine on {eng.device}")
            lines = self._against_torch(eng, [(2, 16, 16)], "fp16")
        return f"{info.gpu_name} sm{info.compute_capability}: {lines[0]}"

    CHECKS = ("versions", "libcudart", "export", "onnxruntime", "profile", "parse", "build", "io", "run", "refused",
              "reuse", "timing_cache", "cuda1")

    def main(self) -> int:
        for name in self.CHECKS:
            t0 = time.perf_counter()
            try:
                status, detail = "PASS", getattr(self, name)()
            except Skip as why:
                status, detail = "SKIP", str(why)
            except Exception as err:  # noqa: BLE001 - reported, and the run stops here
                status, detail = "FAIL", f"{type(err).__name__}: {err}"
                self.results.append({"check": name, "status": status, "detail": detail,
                                     "traceback": traceback.format_exc(), "seconds": round(time.perf_counter() - t0, 2)})
                print(f"FAIL {name}: {detail}", flush=True)
                break
            self.results.append({"check": name, "status": status, "detail": detail, "seconds": round(time.perf_counter() - t0, 2)})
            print(f"{status} {name}: {detail}", flush=True)
        (self.out / "trt_smoke.json").write_text(json.dumps({"results": self.results}, indent=2))
        failed = [r for r in self.results if r["status"] == "FAIL"]
        skipped = [r["check"] for r in self.results if r["status"] == "SKIP"]
        if skipped:
            print(f"not checked here: {', '.join(skipped)} (run this on a machine with TensorRT and a CUDA GPU)")
        print(f"{'FAILED' if failed else 'done'}; records in {self.out / 'trt_smoke.json'}")
        return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for exports, engines and trt_smoke.json [default: a temporary folder]")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="trt_smoke."))
    out.mkdir(parents=True, exist_ok=True)
    return Smoke(out).main()


if __name__ == "__main__":
    sys.exit(main())
