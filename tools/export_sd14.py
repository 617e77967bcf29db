"""Measure the ONNX export of the full-size SD1.4 UNet (random weights: no download) on this machine.

    python tools/export_sd14.py [--out DIR] [--dtype fp32|fp16] [--check]

Builds ``sd14`` with seeded random weights, exports it with ``export_unet_onnx`` (TorchScript exporter, opset
19, one external data file) and prints the wall time, the file sizes and the process's peak memory. ``--check``
also runs the ONNX once in onnxruntime (CPU) and compares it with PyTorch at batch 2, 64×64 latents.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="export folder (default: a temporary folder, removed after)")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--check", action="store_true", help="run the export in onnxruntime and compare with PyTorch")
    args = ap.parse_args()

    import torch

    from slimexport.engines.onnx_export import export_unet_onnx
    from slimexport.engines.torch_runner import available_cpus, device_name
    from slimexport.models import load_model

    t0 = time.perf_counter()
    unet = load_model("sd14", random_weights=True).unet
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"built sd14 UNet ({n_params / 1e6:.1f} M params) in {load_s:.1f} s; peak RSS {peak_rss_gb():.2f} GB", flush=True)

    tmp = None
    out = args.out
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="export_sd14."))
        out = tmp / "sd14"
    try:
        res = export_unet_onnx(unet, out, dtype=args.dtype)
        record = {
            "date": datetime.date.today().isoformat(), "machine": device_name("cpu"), "cpus": available_cpus(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "dtype": args.dtype,
            "params_m": round(n_params / 1e6, 1), "export_seconds": res.export_seconds,
            "model_onnx_bytes": res.onnx_path.stat().st_size, "model_onnx_data_bytes": res.data_path.stat().st_size,
            "size_bytes": res.size_bytes, "nodes": sum(res.op_counts.values()), "peak_rss_gb": round(peak_rss_gb(), 2),
            "versions": res.versions,
        }
        print(json.dumps(record, indent=2), flush=True)
        if args.check:
            import numpy as np

            from slimexport.engines.base import build_engine, make_feeds
            from slimexport.verify.metrics import compare

            eng = build_engine("onnxruntime", out)
            feeds = make_feeds(res.io_spec, 2, 64, 64)
            t1 = time.perf_counter()
            got = eng.run(feeds)["latent"]
            ort_s = time.perf_counter() - t1
            eng.close()
            with torch.no_grad():
                ref = unet(*(torch.from_numpy(feeds[k]).float() for k in ("sample", "timestep", "encoder_hidden_states")),
                           return_dict=False)[0].numpy()
            m = compare(got, ref.astype(np.float32), args.dtype)
            print(json.dumps({"ort_run_seconds": round(ort_s, 2), "max_abs": m["max_abs"], "cosine": m["cosine"],
                              "sqnr_db": m["sqnr_db"], "passed": m["passed"], "peak_rss_gb": round(peak_rss_gb(), 2)}),
                  flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
