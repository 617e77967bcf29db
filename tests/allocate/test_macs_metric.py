"""``--budget-metric macs``: per-rank MAC costs agree with a counted forward, and the budget holds in MACs."""

import pytest

from slimexport.allocate.api import plan_ranks
from slimexport.config import AllocConfig, DecomposeConfig
from slimexport.decompose.api import slim_unet
from slimexport.models.macs import count_macs


@pytest.mark.parametrize("targets", [("attn", "ffn"), ("attn", "ffn", "resnet")])
def test_mac_costs_match_counted_macs(tiny, tiny_stats, targets):
    acfg = AllocConfig(budget=0.6, targets=targets, metric="macs")
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), acfg, latent_hw=(16, 16))
    slim, _ = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    dense_macs, slim_macs = count_macs(tiny.unet, 1, 16, 16)["total"], count_macs(slim, 1, 16, 16)["total"]
    predicted = sum((m["max_rank"] - m["rank"]) * m["alloc_cost"] for m in plan["modules"].values())
    assert dense_macs - slim_macs == predicted
    a = plan["allocation"]
    assert 0 <= a["target"] - a["kept"] <= a["max_step"]
    assert sum(p.numel() for p in slim.parameters()) == plan["params"]["slim_total"]


def test_whole_unet_mac_budget(tiny, tiny_stats):
    acfg = AllocConfig(budget=0.8, targets=("attn", "ffn", "resnet"), metric="macs", scope="unet")
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), acfg, latent_hw=(16, 16))
    slim, _ = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    ratio = count_macs(slim, 1, 16, 16)["total"] / count_macs(tiny.unet, 1, 16, 16)["total"]
    assert 0.8 - 0.05 <= ratio <= 0.8 + 1e-9
