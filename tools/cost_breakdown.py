"""Share of a registry UNet's parameters and MACs (batch 1) held by each compressible module type.

    python tools/cost_breakdown.py --model sd14 --latent 64

Runs on the meta device (no weights, no memory): the counts come from the same per-rank cost functions the
allocator uses (the kinds table, ``slimexport.models.kinds``) and a hooked forward (``count_macs``).
"""

import argparse

import torch

from slimexport.models.kinds import KINDS, find_units
from slimexport.models.load import build_unet
from slimexport.models.macs import count_macs, token_counts
from slimexport.models.registry import REGISTRY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd14", choices=sorted(REGISTRY))
    ap.add_argument("--latent", type=int, default=None, help="latent height = width (default: the model's sample size)")
    args = ap.parse_args()
    with torch.device("meta"):
        unet = build_unet(REGISTRY[args.model].unet_config)
    size = args.latent or int(unet.config.sample_size)
    tokens = token_counts(unet, size, size)
    total_macs = count_macs(unet, 1, size, size)["total"]
    total_params = sum(p.numel() for p in unet.parameters())
    rows: dict[str, list[int]] = {}
    found = find_units(unet)
    for kind in KINDS.values():
        for info in found[kind.unit]:
            acc = rows.setdefault(kind.name, [0, 0])
            acc[0] += kind.unit_params(info) * kind.max_rank(info)
            acc[1] += kind.unit_macs(info, tokens[info.path], 77) * kind.max_rank(info)
    print(f"{args.model}: {total_params:,} parameters, {total_macs / 1e9:.1f} GMAC at batch 1, {size}x{size} latents")
    print(f"{'module':10s} {'params':>8s} {'MACs':>8s}")
    for kind, (p, m) in rows.items():
        print(f"{kind:10s} {p / total_params:8.1%} {m / total_macs:8.1%}")


if __name__ == "__main__":
    main()
