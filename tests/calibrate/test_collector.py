import pytest
import torch

from slimexport.calibrate.collector import StatsCollector, step_to_bin
from slimexport.errors import NumericalError
from slimexport.models.arch import blocks


def _hook_count(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def test_hooks_are_removed_exactly_and_others_kept(tiny, tiny_inputs):
    unet = tiny.unet
    foreign = unet.conv_in.register_forward_hook(lambda *a: None)
    before = _hook_count(unet)
    x, ctx, ts = tiny_inputs
    with StatsCollector(unet, blocks(unet), num_steps=2, num_bins=2, device="cpu") as col:
        assert _hook_count(unet) > before
        col.set_step(0)
        unet(x, torch.full((4,), ts[0]), ctx)
    assert _hook_count(unet) == before
    foreign.remove()


def test_no_hook_stays_when_registering_fails_halfway(tiny, monkeypatch):
    from slimexport.models.arch import resnet_blocks

    unet = tiny.unet
    before = _hook_count(unet)
    resnets = resnet_blocks(unet)
    col = StatsCollector(unet, blocks(unet), num_steps=2, num_bins=2, device="cpu", resnets=resnets)
    real = col._tap

    def broken(path, tap, mod):
        if path == resnets[0].path:
            raise RuntimeError("cannot hook this ResNet")
        return real(path, tap, mod)

    monkeypatch.setattr(col, "_tap", broken)  # after every transformer block is hooked
    with pytest.raises(RuntimeError, match="cannot hook"), col:
        pass
    assert _hook_count(unet) == before


def test_correlation_equals_manual_sum(tiny, tiny_inputs):
    unet = tiny.unet
    bl = blocks(unet)[0]
    seen = []
    h = unet.get_submodule(bl.path).ff.net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x, ctx, ts = tiny_inputs
    col = StatsCollector(unet, blocks(unet), num_steps=4, num_bins=2, device="cpu")
    with col:
        for step, t in enumerate(ts):
            col.set_step(step)
            unet(x, torch.full((4,), t), ctx)
    h.remove()
    corr, counts, scalars = col.finalize()
    for b in range(2):
        zs = torch.cat([s.reshape(-1, s.shape[-1]) for i, s in enumerate(seen) if step_to_bin(i, 4, 2) == b])
        assert torch.allclose(corr[f"{bl.path}.z"][b], zs.T @ zs, rtol=1e-4, atol=1e-3)
        assert float(counts[f"{bl.path}.z"][b]) == zs.shape[0]
    assert float(scalars[f"{bl.path}.z"][0]) == pytest.approx(float((seen[0] ** 2).sum()), rel=1e-5)


def test_offload_matches_resident(tiny, tiny_inputs, monkeypatch):
    unet = tiny.unet
    x, ctx, ts = tiny_inputs

    def run(offload):
        col = StatsCollector(unet, blocks(unet), num_steps=4, num_bins=2, device="cpu")
        if offload:  # exercise the offload bookkeeping on the CPU
            col.offload = True
            col._live = {k: torch.zeros_like(v[0]) for k, v in col.corr.items() if v.dim() == 3}
        with col:
            for step, t in enumerate(ts):
                col.set_step(step)
                unet(x, torch.full((4,), t), ctx)
        return col.finalize()[0]

    a, b = run(False), run(True)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-4), k


def test_nan_in_statistics_names_module_and_bin(tiny, tiny_inputs):
    unet = tiny.unet
    bl = blocks(unet)[1]
    x, ctx, ts = tiny_inputs
    col = StatsCollector(unet, blocks(unet), num_steps=2, num_bins=2, device="cpu")
    with col:
        col.set_step(0)
        unet(x, torch.full((4,), ts[0]), ctx)
        col.set_step(1)
        unet(x, torch.full((4,), ts[1]), ctx)
    col.corr[f"{bl.path}.z"][1, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match=rf"{bl.path}.*GEGLU output.*timestep bin 1"):
        col.finalize()


def test_step_to_bin_groups_consecutive_steps():
    assert [step_to_bin(i, 10, 5) for i in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [step_to_bin(i, 7, 3) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]
