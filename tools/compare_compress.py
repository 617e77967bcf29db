"""Compare this checkout's compression of a model with a compress folder written earlier (a refactor's
"no behaviour change" check).

    slimexport compress --model digits --budget 0.73 --allocation softmax --calib-prompts 16 --calib-steps 4 --out /tmp/before
    # ... change the code ...
    python tools/compare_compress.py /tmp/before [--recalibrate]

Reads the folder's config and calibration statistics, plans and decomposes again with the current code (with
``--recalibrate`` also calibrates again and compares the statistics), and prints whether the ranks and
relative errors are equal and the largest differences of the slim UNet's outputs on fixed inputs (and of the
statistics) relative to the folder's.
"""

import argparse
import json

import torch

from slimexport.allocate.api import plan_ranks
from slimexport.calibrate import CalibStats, calibrate, select_prompts
from slimexport.config import CompressConfig
from slimexport.decompose.api import Factorisations, slim_unet
from slimexport.models.load import load_model
from slimexport.slim.apply import load_slim_unet


def _outputs(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    e = torch.randn(2, 6, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 500]), encoder_hidden_states=e).sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--recalibrate", action="store_true")
    args = ap.parse_args()
    man = json.load(open(f"{args.folder}/manifest.json"))
    cfg = CompressConfig.from_dict(man["config"])
    bundle = load_model(cfg.model, random_weights=cfg.random_weights)
    stats = base = CalibStats.load(f"{args.folder}/calib")
    if args.recalibrate:
        stats = calibrate(bundle, select_prompts(bundle, cfg.calib, device="cpu"), cfg.calib, progress=False)
        print("statistics: max relative difference: correlations",
              max(_rel(stats.corr[k], v) for k, v in base.corr.items()),
              "scalars", max(_rel(stats.scalars[k], v) for k, v in base.scalars.items()))
    unet = bundle.unet.float().eval()
    factors = Factorisations() if cfg.alloc.method == "greedy" else None
    plan = plan_ranks(unet, stats, cfg.decompose, cfg.alloc, latent_hw=bundle.latent_size(cfg.calib.height, cfg.calib.width),
                      factors=factors)
    before = json.load(open(f"{args.folder}/plan.json"))
    slim, diag = slim_unet(unet, stats, plan, cfg.decompose, progress=False, factors=factors)
    same_errors = all(abs(diag["rel_error"][k] - m["rel_error"]) <= 1e-9 * max(1.0, abs(m["rel_error"]))
                      or m["rel_error"] != m["rel_error"] for k, m in before["modules"].items())
    print("ranks equal:", dict(plan["ranks"]) == before["ranks"], "| relative errors equal:", same_errors)
    print("slim outputs: max relative difference", _rel(_outputs(slim), _outputs(load_slim_unet(args.folder))))


if __name__ == "__main__":
    main()
