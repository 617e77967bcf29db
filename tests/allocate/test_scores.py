import pytest
import torch

from slimexport.allocate.api import plan_ranks
from slimexport.allocate.scores import aggregate, module_score, sis_per_step
from slimexport.config import AllocConfig, DecomposeConfig


def test_sis_of_isotropic_inputs_is_one(tiny_stats):
    # Replace one module's scalars with those of isotropic inputs: ‖xA‖² = ‖x‖²·‖A‖²_F / n.
    stats = tiny_stats
    block = stats.blocks[0]
    saved = dict(stats.scalars)
    try:
        n, fro2 = block.width, 7.0
        den = torch.full((stats.num_steps,), 3.0, dtype=torch.float64)
        stats.scalars[f"{block.path}.x"] = den
        stats.scalars[f"{block.path}.attn1.qk"] = den * fro2 / n
        assert torch.allclose(sis_per_step(stats, block, "attn1.qk", fro2), torch.ones(stats.num_steps, dtype=torch.float64))
    finally:
        stats.scalars.clear()
        stats.scalars.update(saved)


def test_timestep_weights_sum_to_one_and_uniform_ablation(tiny_stats, tiny):
    block = tiny_stats.blocks[0]
    w = tiny.unet.get_submodule(block.path).ff.net[2].weight.double()
    spectral = module_score(tiny_stats, block, "ff", float((w**2).sum()), "spectral", False)
    uniform = module_score(tiny_stats, block, "ff", float((w**2).sum()), "uniform", False)
    assert float(spectral.weights.sum()) == pytest.approx(1.0)
    assert torch.allclose(uniform.weights, torch.full_like(uniform.weights, 1 / tiny_stats.num_steps))
    assert float(spectral.bin_weights.sum()) == pytest.approx(1.0)


def test_aggregate_is_trace_normalised(tiny_stats):
    block = tiny_stats.blocks[1]
    c = aggregate(tiny_stats, block, "z", torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    assert float(torch.trace(c)) == pytest.approx(1.0)
    assert torch.allclose(c, c.T)


def test_plan_counts_match_formulas(tiny, tiny_stats):
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.73))
    p = plan["params"]
    assert 0 <= p["target"] - p["targeted_slim"] <= p["max_step"]
    assert p["dense_total"] == sum(t.numel() for t in tiny.unet.parameters())
    # FFN cost per channel is 3C + 2, attention cost per unit of per-head rank H·(n_in + n_out)
    for name, m in plan["modules"].items():
        block = next(b for b in tiny_stats.blocks if name.startswith(b.path))
        if m["kind"] == "ff":
            assert m["unit_cost"] == 3 * block.width + 2
        elif m["kind"] in ("attn2.qk", "attn2.vo"):
            assert m["unit_cost"] == block.num_heads * (block.width + block.context_dim)
        else:
            assert m["unit_cost"] == block.num_heads * 2 * block.width


def test_targets_subset_only_plans_those(tiny, tiny_stats):
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.73, targets=("ffn",)))
    assert all(m["kind"] == "ff" for m in plan["modules"].values())
