"""CPU: the slim UNet's attention with and without padding q/k/v to one head size (the reference's fused-SDPA path).

    python tools/bench_sdpa_pad.py [--model tiny] [--budget 0.6] [--latent 32] [--batch 2] [--threads 2]

Compresses the model (small calibration, attn+ffn) into a temporary folder, then times, interleaved, the dense UNet,
the slim UNet through the kernel dispatch (its CPU reference pads unequal head sizes) and the slim UNet on plain
SDPA (``install_processors(kernel=None)``: unequal head sizes take PyTorch's math fallback). Prints p50 ms with
machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()

    import torch

    from slimexport.api import compress
    from slimexport.config import AllocConfig, CalibConfig, CompressConfig
    from slimexport.models import load_model
    from slimexport.slim.apply import install_processors
    from slimexport.timer import call_ms

    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    cfg = CompressConfig(model=args.model, device="cpu", alloc=AllocConfig(budget=args.budget),
                         calib=CalibConfig(num_prompts=2, num_steps=2, num_bins=2, batch_size=2))
    with tempfile.TemporaryDirectory() as tmp:
        slim = compress(cfg, out=Path(tmp) / "c", bundle=bundle, progress=False).load_slim()
    plain = __import__("copy").deepcopy(slim)
    install_processors(plain, kernel=None)
    g = torch.Generator().manual_seed(0)
    c = bundle.unet.config
    x = torch.randn(args.batch, int(c.in_channels), args.latent, args.latent, generator=g)
    t = torch.full((args.batch,), 500.0)
    ctx = torch.randn(args.batch, 77, int(c.cross_attention_dim), generator=g)
    models = {"dense": bundle.unet, "slim (padded SDPA)": slim, "slim (plain SDPA)": plain}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(x, t, ctx)
        for _ in range(args.iterations):
            for k, m in models.items():
                times[k].append(call_ms(lambda m=m: m(x, t, ctx), "cpu"))
    print(f"{args.model} budget {args.budget} (attn,ffn), batch {args.batch}, {args.latent}x{args.latent} latents, "
          f"{args.threads} threads, {args.iterations} interleaved iterations; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    for k, v in times.items():
        print(f"  {k:20s} p50 {statistics.median(v):8.2f} ms")


if __name__ == "__main__":
    main()
