"""Time SlimSet's pool embedding: the 77-token encoding against ``embed_prompts`` (each batch padded to its longest
prompt, batches of similar lengths), on one model and device; prints both times, their ratio and the largest
difference of the embeddings.

    python tools/bench_prompt_embed.py --model sd14 --random-weights --prompts 256 [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd14")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--prompts", type=int, default=256, help="the first N prompts of the shipped pool (0: all)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from slimexport.calibrate.api import ENCODE_BATCH, embed_prompts
    from slimexport.calibrate.prompts import shipped_pool
    from slimexport.models import load_model

    bundle = load_model(args.model, random_weights=args.random_weights)
    pool = shipped_pool()[0]
    pool = pool[: args.prompts] if args.prompts else pool
    enc = bundle.encoder.on_device(args.device)

    def sync():
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    embed_prompts(bundle, pool[:8], args.device)  # warm-up
    sync()
    t = time.perf_counter()
    full = torch.cat([enc.encode(pool[i:i + ENCODE_BATCH])[1].float().cpu() for i in range(0, len(pool), ENCODE_BATCH)])
    sync()
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    new = embed_prompts(bundle, pool, args.device)
    sync()
    t_new = time.perf_counter() - t
    row = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "machine": platform.node(),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "model": args.model, "prompts": len(pool), "full_77_tokens_s": round(t_full, 2),
           "embed_prompts_s": round(t_new, 2), "speedup": round(t_full / t_new, 2),
           "max_abs_diff": float((full - new).abs().max()), "max_abs": float(full.abs().max())}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
