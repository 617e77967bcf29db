"""The ``proj`` target end to end on ``tiny``: statistics, allocation at the break-even rank, LowRankProj layers,
save/load, MACs, ONNX export as two MatMuls, dispatch on the CPU."""

import collections

import pytest
import torch
import torch.nn as nn

from slimexport.config import AllocConfig, DecomposeConfig
from slimexport.slim.lowrank import LowRankProj, factor_layer

PROJ = ("attn", "ffn", "proj")


@pytest.fixture(scope="module")
def proj_slim(tiny, tiny_stats):
    from slimexport.allocate.api import plan_ranks
    from slimexport.decompose.api import slim_unet

    # softmax: the greedy default keeps tiny's projections whole at 0.6 (cheaper error elsewhere); here they must be cut
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.6, targets=PROJ, method="softmax"))
    return slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False) + (plan,)


@pytest.mark.parametrize("conv", [False, True])
def test_lowrank_proj_equals_the_layer_it_factors(conv):
    g = torch.Generator().manual_seed(0)
    dense = nn.Conv2d(12, 10, 1) if conv else nn.Linear(12, 10)
    parent = nn.Module()
    parent.p = dense
    x = torch.randn(2, 12, 3, 5, generator=g) if conv else torch.randn(2, 7, 12, generator=g)
    want = dense(x)
    w = dense.weight.detach().reshape(10, 12)
    new = factor_layer(parent, "p", w.T.contiguous(), torch.eye(10), dense.bias.detach())  # U = Wᵀ, V = I: exact
    assert isinstance(parent.p, LowRankProj) and new.conv == conv and new.rank == 10
    assert torch.allclose(parent.p(x), want, atol=1e-6)


def test_statistics_hold_the_projection_inputs(tiny, tiny_stats):
    from slimexport.models.arch import projections

    projs = projections(tiny.unet)
    assert projs and [p.path for p in tiny_stats.projs] == [p.path for p in projs]
    p = projs[0]
    for key, n in (("pi", p.channels), ("po", p.inner)):
        c = tiny_stats.corr[f"{p.path}.{key}"]
        assert c.shape == (tiny_stats.num_bins, n, n)
        assert torch.allclose(c, c.transpose(1, 2)) and bool((torch.diagonal(c, dim1=1, dim2=2) > 0).all())
    assert float(tiny_stats.scalars[f"{p.path}.proj_in"].sum()) > 0


def test_statistics_match_a_direct_computation(tiny):
    """One forward with the collector = Σ xᵀx of the proj_in input taken by a separate hook."""
    from slimexport.calibrate.collector import StatsCollector
    from slimexport.models.arch import blocks, projections

    unet, p = tiny.unet, projections(tiny.unet)[0]
    seen = []
    h = unet.get_submodule(p.path).proj_in.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    try:
        with torch.no_grad(), StatsCollector(unet, blocks(unet), 1, 1, "cpu", projs=[p]) as col:
            unet(x, torch.tensor([10, 10]), ctx)
    finally:
        h.remove()
    tokens = seen[0].movedim(1, -1).reshape(-1, p.channels).double()
    assert torch.allclose(col.corr[f"{p.path}.pi"][0].double(), tokens.T @ tokens, rtol=1e-4, atol=1e-4)


def test_allocation_uses_the_break_even_rank(tiny, tiny_stats):
    from slimexport.allocate.api import plan_ranks

    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.6, targets=PROJ))
    mods = {k: v for k, v in plan["modules"].items() if v["kind"] in ("proj_in", "proj_out")}
    assert len(mods) == 2 * len(tiny_stats.projs)
    for name, m in mods.items():
        layer = tiny.unet.get_submodule(name)
        n_in, n_out = layer.weight.shape[1], layer.weight.shape[0]
        assert m["max_rank"] == n_in * n_out // (n_in + n_out)
        assert m["unit_cost"] == n_in + n_out and 1 <= m["rank"] <= m["max_rank"]
    a = plan["allocation"]
    assert a["kept"] <= a["target"] + 1e-6 and a["target"] - a["kept"] <= a["max_step"]


def test_budget_one_keeps_every_projection_dense(tiny, tiny_stats, tiny_inputs):
    from slimexport.allocate.api import plan_ranks
    from slimexport.decompose.api import slim_unet

    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=1.0, targets=PROJ))
    slim, diag = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    assert not any(isinstance(m, LowRankProj) for m in slim.modules())
    assert all(diag["rel_error"][k] == 0.0 for k in plan["ranks"] if ".proj_" in k)
    x, ctx, ts = tiny_inputs
    t = torch.full((x.shape[0],), float(ts[0]))
    d, s = tiny.unet(x, t, ctx).sample, slim(x, t, ctx).sample
    assert float((d - s).norm() / d.norm()) < 1e-5


def test_slim_unet_factors_projections_and_round_trips(proj_slim, tiny, tiny_inputs, tmp_path):
    from slimexport.models.macs import count_macs
    from slimexport.slim.apply import load_slim_unet, save_slim_unet

    slim, diag, plan = proj_slim
    factored = {n: m for n, m in slim.named_modules() if isinstance(m, LowRankProj)}
    assert factored and all(m.conv for m in factored.values())  # tiny uses 1×1 conv projections
    for name, m in factored.items():
        assert m.rank == plan["ranks"][name] < plan["modules"][name]["max_rank"]
        assert 0 < diag["rel_error"][name] < 1
    dense_n, slim_n = (sum(p.numel() for p in u.parameters()) for u in (tiny.unet, slim))
    assert slim_n == plan["params"]["slim_total"] and slim_n < dense_n
    # MACs: each factored layer costs positions · r · (in + out)
    assert count_macs(slim)["total"] < count_macs(tiny.unet)["total"]
    save_slim_unet(slim, tmp_path / "s", plan)
    back = load_slim_unet(tmp_path / "s")
    assert {n for n, m in back.named_modules() if isinstance(m, LowRankProj)} == set(factored)
    x, ctx, ts = tiny_inputs
    t = torch.full((x.shape[0],), float(ts[1]))
    assert torch.equal(slim(x, t, ctx).sample, back(x, t, ctx).sample)


def test_projection_dispatch_picks_torch_on_cpu(proj_slim, tiny_inputs, monkeypatch):
    import importlib

    op = importlib.import_module("slimexport.kernels.lowrank_linear")  # the module (the package attribute is the function)
    slim = proj_slim[0]
    factored = [m for m in slim.modules() if isinstance(m, LowRankProj)]
    assert factored
    x, ctx, ts = tiny_inputs
    t = torch.full((x.shape[0],), float(ts[0]))
    with torch.no_grad():
        want = slim(x, t, ctx).sample
    calls = []
    real = op.lowrank_linear_ref

    def ref_spy(x, u, v, bias):
        calls.append((x.device.type, u.shape))
        return real(x, u, v, bias)

    def triton_must_not_run(*args, **kwargs):
        raise AssertionError("the Triton lowrank_linear ran on the CPU")

    monkeypatch.delenv("SLIMEXPORT_KERNELS", raising=False)
    monkeypatch.setattr(op, "lowrank_linear_ref", ref_spy)
    monkeypatch.setattr(op, "lowrank_linear_triton", triton_must_not_run)
    with torch.no_grad():
        got = slim(x, t, ctx).sample
    # every factored projection ran through the torch reference, once per forward, on the CPU
    assert sorted(calls) == sorted(("cpu", m.u.shape) for m in factored)
    assert torch.equal(got, want)


def test_onnx_export_has_two_matmuls_per_factored_projection(proj_slim, tiny, tmp_path):
    import onnx

    from slimexport.engines.base import EngineConfig, build_engine, make_feeds
    from slimexport.engines.onnx_export import export_unet_onnx
    from slimexport.verify.parity import torch_eps

    slim = proj_slim[0]
    n_factored = sum(isinstance(m, LowRankProj) for m in slim.modules())
    ops = {}
    for name, model in (("dense", tiny.unet), ("slim", slim)):
        r = export_unet_onnx(model, tmp_path / name, sample_shape=(2, 4, 16, 16))
        g = onnx.load(str(r.folder / "model.onnx"), load_external_data=False).graph
        ops[name] = collections.Counter(n.op_type for n in g.node)
    assert ops["slim"]["MatMul"] - ops["dense"]["MatMul"] == 2 * n_factored
    assert ops["dense"]["Conv"] - ops["slim"]["Conv"] == n_factored
    eng = build_engine("onnxruntime", r.folder, EngineConfig(device="cpu"))
    feeds = make_feeds(eng.io_spec, 2, 16, 16)
    got = torch.as_tensor(eng.run(feeds)["latent"])
    assert float((got - torch_eps(slim, feeds)).abs().max()) < 1e-4


def test_proj_target_without_projection_statistics_says_recalibrate(tiny, tiny_stats):
    import dataclasses

    from slimexport.allocate.api import plan_ranks
    from slimexport.errors import UsageError

    old = dataclasses.replace(tiny_stats, projs=[])
    with pytest.raises(UsageError, match="recalibrate"):
        plan_ranks(tiny.unet, old, DecomposeConfig(), AllocConfig(budget=0.6, targets=PROJ))


def test_proj_target_on_unfactorable_projections_says_drop_proj(tiny, tiny_stats):
    import copy
    import dataclasses

    from slimexport.allocate.api import plan_ranks
    from slimexport.errors import UsageError

    unet = copy.deepcopy(tiny.unet)
    t = next(m for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    t.proj_in = nn.Conv2d(t.proj_in.in_channels, t.proj_in.out_channels, 3, padding=1)
    with pytest.raises(UsageError, match="drop 'proj'"):
        plan_ranks(unet, dataclasses.replace(tiny_stats, projs=[]), DecomposeConfig(), AllocConfig(budget=0.6, targets=PROJ))


def test_torch_export_of_factored_projections_matches_eager(proj_slim):
    """The AOTInductor backend's export (dynamic batch and size) takes LowRankProj: two matmuls, same outputs."""
    from slimexport.engines.aoti import export_unet
    from slimexport.engines.base import EngineProfile

    slim = proj_slim[0]
    prof = EngineProfile(min_batch=1, opt_batch=2, max_batch=4, min_height=8, opt_height=16, max_height=32,
                         min_width=8, opt_width=16, max_width=32, latent_multiple=4)
    cfg = slim.config
    ep, dynamic, fallback = export_unet(slim, prof, in_channels=int(cfg.in_channels), context_dim=int(cfg.cross_attention_dim),
                                        dtype=torch.float32, device=torch.device("cpu"))
    assert dynamic["batch"] and fallback is None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 24, 24, generator=g)
    t = torch.tensor([10.0, 500.0, 900.0])
    ctx = torch.randn(3, 77, int(cfg.cross_attention_dim), generator=g)
    with torch.no_grad():
        want = slim(x, t, ctx).sample
        got = ep.module()(x, t, ctx)
    assert torch.allclose(got, want, atol=1e-5)
