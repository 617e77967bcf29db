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
    stats = tiny_stats
    block = stats.blocks[0]
    w = tiny.unet.get_submodule(block.path).ff.net[2].weight.double()
    fro2 = float((w**2).sum())
    spectral = module_score(stats, block, "ff", fro2, "spectral", False)
    uniform = module_score(stats, block, "ff", fro2, "uniform", False)
    # The method's definition, from the collector's raw scalars: SIS[t] = n·‖x_t A‖² / (‖x_t‖²·‖A‖²_F),
    # w[t] = SIS[t] / Σ SIS, bin weight = Σ_{t in bin} w[t], s = Σ w[t]·SIS[t].
    sis = block.ffn_width * stats.scalars[f"{block.path}.ff"].double() / (stats.scalars[f"{block.path}.z"].double() * fro2)
    assert torch.allclose(spectral.sis, sis)
    assert torch.allclose(spectral.weights, sis / sis.sum())
    assert float(spectral.weights.sum()) == pytest.approx(1.0)
    assert spectral.score == pytest.approx(float((sis * sis / sis.sum()).sum()))
    assert spectral.propagation == 1.0
    bins = [i * stats.num_bins // stats.num_steps for i in range(stats.num_steps)]
    assert len(set(bins)) == stats.num_bins
    expect_bins = torch.tensor([float(sum(spectral.weights[i] for i in range(stats.num_steps) if bins[i] == b))
                                for b in range(stats.num_bins)], dtype=torch.float64)
    assert torch.allclose(spectral.bin_weights, expect_bins)
    assert float(spectral.bin_weights.sum()) == pytest.approx(1.0)
    # The scores vary over the steps, so spectral weighting is not the uniform ablation.
    assert float(sis.max() - sis.min()) > 1e-3 * float(sis.mean())
    assert not torch.allclose(spectral.weights, uniform.weights)
    # The ablation: w = 1/T, per-bin sums of it, and s = the plain mean of the same SIS.
    assert torch.allclose(uniform.sis, sis)
    assert torch.allclose(uniform.weights, torch.full_like(uniform.weights, 1 / stats.num_steps))
    assert torch.allclose(uniform.bin_weights, torch.tensor([bins.count(b) / stats.num_steps for b in range(stats.num_bins)],
                                                            dtype=torch.float64))
    assert uniform.score == pytest.approx(float(sis.mean()))
    # With propagation, the score is scaled by g = sqrt(Σ output energy / Σ block-input energy).
    prop = module_score(stats, block, "ff", fro2, "spectral", True)
    g = (stats.scalars[f"{block.path}.out.ff"].double().sum() / stats.scalars[f"{block.path}.out.block_in"].double().sum()).sqrt()
    assert prop.propagation == pytest.approx(float(g))
    assert prop.score == pytest.approx(spectral.score * float(g))


def test_aggregate_is_trace_normalised(tiny_stats):
    block = tiny_stats.blocks[1]
    corr = tiny_stats.corr[f"{block.path}.z"].double()
    assert corr.shape[0] == tiny_stats.num_bins == 3
    bw = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    c = aggregate(tiny_stats, block, "z", bw)
    # C̄ = Σ_b w_b · C_b / tr(C_b), by hand
    expect = sum(float(bw[b]) * corr[b] / torch.trace(corr[b]) for b in range(3))
    assert torch.allclose(c, expect, rtol=1e-10, atol=1e-14)
    assert float(torch.trace(c)) == pytest.approx(1.0)
    assert torch.allclose(c, c.T)
    # One-hot weights pick out one bin's trace-normalised correlation; the bins differ, so the weights matter.
    onehot = [aggregate(tiny_stats, block, "z", torch.eye(3, dtype=torch.float64)[b]) for b in range(3)]
    for b in range(3):
        assert torch.allclose(onehot[b], corr[b] / torch.trace(corr[b]), rtol=1e-10, atol=1e-14)
    assert not torch.allclose(onehot[0], onehot[2], rtol=1e-3, atol=0)
    assert not torch.allclose(c, onehot[0], rtol=1e-3, atol=0)


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
    expect = {f"{b.path}.ff" for b in tiny_stats.blocks}
    assert len(expect) == len(tiny_stats.blocks) > 0
    assert set(plan["modules"]) == expect
    assert set(plan["ranks"]) == expect
    assert all(m["kind"] == "ff" for m in plan["modules"].values())
    assert plan["targets"] == ["ffn"]
    assert 0 < plan["params"]["targeted_slim"] < plan["params"]["targeted_dense"]
