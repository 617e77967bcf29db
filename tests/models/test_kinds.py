"""The kinds table: its entries agree with the models they describe and with every stage that reads them."""

import pytest
import torch

from slimexport.config import TARGETS
from slimexport.decompose.methods import METHODS
from slimexport.models.kinds import KINDS, UNITS, find_units, stat_keys, targeted_kinds, unit_kinds


def test_every_kind_has_a_unit_a_method_and_a_target():
    for kind in KINDS.values():
        assert kind.unit in UNITS, kind.name
        assert kind.decomposition in METHODS, kind.name
        assert kind.input_layer in kind.layers, kind.name
        unit = UNITS[kind.unit]
        assert kind.input_stat in unit.stats and all(s in unit.stats for s in kind.whiten), kind.name
        assert kind.output_energy in stat_keys(unit), kind.name  # the collector measures what the score reads
    assert set(TARGETS) == {k.target for k in KINDS.values()}  # the CLI's --targets choices are the table's


def test_targets_select_kinds_in_table_order():
    assert targeted_kinds(("ffn", "attn")) == ("attn1.qk", "attn1.vo", "attn2.qk", "attn2.vo", "ff")
    assert targeted_kinds(("proj",)) == ("proj_in", "proj_out")
    assert [k.name for k in unit_kinds("resnet")] == ["resnet"]


def _params(mod) -> int:
    return sum(p.numel() for p in mod.parameters()) if mod is not None else 0


@pytest.mark.parametrize("kind", [k for k in KINDS if KINDS[k].slim != "lowrank"])
def test_unit_params_times_max_rank_is_the_dense_layers(tiny, kind):
    """Each rank step's cost is exact: a dense module's layers hold ``max_rank × unit_params`` parameters (the
    attention pair's two projections; the FFN's GEGLU and down projection; the ResNet block's inner-channel layers)."""
    k = KINDS[kind]
    for info in find_units(tiny.unet)[k.unit]:
        mod = tiny.unet.get_submodule(info.path)
        held = sum(_params(k.layer(mod, role)) for role in k.layers)
        out_side = {"vo_whiten_svd": "right", "ffn_nystrom": "down", "resnet_group_nystrom": "conv2"}.get(k.decomposition)
        if out_side is not None and k.layer(mod, out_side).bias is not None:  # the output layer's bias has no rank
            held -= k.layer(mod, out_side).bias.numel()
        assert held == k.max_rank(info) * k.unit_params(info), info.path


def test_projection_break_even_costs_no_more_than_the_dense_layer(tiny):
    for name in ("proj_in", "proj_out"):
        k = KINDS[name]
        for info in find_units(tiny.unet)["proj"]:
            layer = k.layer(tiny.unet.get_submodule(info.path), "layer")
            dense = layer.weight.numel()
            assert k.max_rank(info) * k.unit_params(info) <= dense < (k.max_rank(info) + 1) * k.unit_params(info)


def test_layers_name_real_modules(tiny):
    units = find_units(tiny.unet)
    for kind in KINDS.values():
        for info in units[kind.unit]:
            mod = tiny.unet.get_submodule(info.path)
            for role, path in kind.layers.items():
                if role != "temb":  # a ResNet block may have no time embedding
                    assert isinstance(kind.layer(mod, role), torch.nn.Module), f"{info.path}.{path}"
    for unit in UNITS.values():
        for info in units[unit.name]:
            mod = tiny.unet.get_submodule(info.path)
            assert type(mod).__name__ == unit.module_class
            for tap in unit.taps:
                mod.get_submodule(tap.module)  # raises if the table names a module the model lacks


def test_collector_scalars_follow_the_table(tiny):
    from slimexport.calibrate.collector import StatsCollector

    units = find_units(tiny.unet)
    col = StatsCollector(tiny.unet, units["block"], num_steps=2, num_bins=1, device="cpu", resnets=units["resnet"],
                         projs=units["proj"])
    want = {f"{i.path}.{k}" for u in UNITS.values() for i in units[u.name] for k in stat_keys(u)}
    assert set(col.scalars) == want
    assert set(col.corr) == {f"{i.path}.{k}" for u in UNITS.values() for i in units[u.name] for k in u.stats}
