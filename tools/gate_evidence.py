"""Evidence for the default slim-vs-dense gate: the verify metrics of many compressions of one model.

    python tools/gate_evidence.py --model digits --out docs/results/cpu-gate-evidence-digits-2026-12-02.json

One calibration (the README's command-1 settings by default), then for each row a rank plan, a slim UNet and
the same slim-vs-dense comparison ``slimexport build`` gates on (mean relative ε error over the verify
timesteps; cosine of the final latents of a fixed-seed trajectory), with the row's own configuration. The
negative controls (random column and subspace selection) are the models a gate must fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from slimexport.allocate.api import plan_ranks
from slimexport.calibrate import calibrate, select_prompts
from slimexport.config import AllocConfig, CalibConfig, DecomposeConfig, VerifyConfig
from slimexport.decompose.api import Factorisations, slim_unet
from slimexport.models.load import load_model
from slimexport.verify import parity

ROWS = [  # (id, allocation, decomposition, role)
    ("softmax@0.73", AllocConfig(budget=0.73), DecomposeConfig(), "slimdiff"),
    ("uniform@0.73", AllocConfig(budget=0.73, method="uniform"), DecomposeConfig(), "slimdiff"),
    ("greedy@0.73", AllocConfig(budget=0.73, method="greedy"), DecomposeConfig(), "slimdiff"),
    ("softmax@0.5", AllocConfig(budget=0.5), DecomposeConfig(), "slimdiff"),
    ("greedy@0.5", AllocConfig(budget=0.5, method="greedy"), DecomposeConfig(), "slimdiff"),
    ("weight-svd@0.73", AllocConfig(budget=0.73, method="uniform"), DecomposeConfig(qkvo_method="weight", ffn_selection="weight"), "baseline"),
    ("random@0.73", AllocConfig(budget=0.73, method="uniform"), DecomposeConfig(qkvo_method="random", ffn_selection="random"), "negative"),
    ("random@0.5", AllocConfig(budget=0.5, method="uniform"), DecomposeConfig(qkvo_method="random", ffn_selection="random"), "negative"),
    ("random-softmax@0.73", AllocConfig(budget=0.73), DecomposeConfig(qkvo_method="random", ffn_selection="random"), "negative"),
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--calib-prompts", type=int, default=64)
    ap.add_argument("--calib-steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma-separated row ids; rows already in --out are kept (merged)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    kept = []
    if only and os.path.exists(args.out):
        with open(args.out) as f:
            kept = [r for r in json.load(f)["rows"] if r["id"] not in only]
    bundle = load_model(args.model)
    ccfg = CalibConfig(num_prompts=args.calib_prompts, num_steps=args.calib_steps)
    stats = calibrate(bundle, select_prompts(bundle, ccfg, device="cpu"), ccfg, progress=False)
    unet = bundle.unet.float().eval()
    hw = bundle.latent_size()
    vcfg = VerifyConfig()
    inputs = parity.fixed_inputs(bundle, vcfg, hw)
    rows = list(kept)
    for rid, acfg, dcfg, role in ROWS:
        if only and rid not in only:
            continue
        factors = Factorisations() if acfg.method == "greedy" else None
        plan = plan_ranks(unet, stats, dcfg, acfg, latent_hw=hw, factors=factors)
        slim, _ = slim_unet(unet, stats, plan, dcfg, progress=False, factors=factors)
        res = parity.slim_vs_dense(unet, slim, bundle, inputs, vcfg, hw)
        rows.append({"id": rid, "role": role, "eps_rel_error_mean": res["eps_rel_error_mean"],
                     "latent_cosine": res["trajectory"]["cosine"], "trajectory_rel_error": res["trajectory"]["rel_error"],
                     "params_kept": plan["params"]["slim_total"] / plan["params"]["dense_total"]})
        print(f"{rid:22s} {role:9s} eps {rows[-1]['eps_rel_error_mean']:.4f}  cosine {rows[-1]['latent_cosine']:.5f}  "
              f"traj rel {rows[-1]['trajectory_rel_error']:.4f}", flush=True)
        del slim
    out = {"command": "python tools/gate_evidence.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                    if v is not None and k != "only"),
           "machine": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "model": args.model, "verify": vcfg.to_dict(),
           "rows": sorted(rows, key=lambda r: [x[0] for x in ROWS].index(r["id"]))}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
