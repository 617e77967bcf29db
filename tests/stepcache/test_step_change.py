"""Feature-change measurement on the calibration sampler, and the profile's mapping by timestep."""

from __future__ import annotations

import math

import pytest
import torch

from slimexport.config import CalibConfig
from slimexport.errors import ArtifactError, UsageError
from slimexport.stepcache.measure import ChangeCollector, ChangeProfile, measure_change
from slimexport.stepcache.unet import SplitUNet


def test_profile_shape_and_values(tiny_profile):
    p = tiny_profile
    assert p.timesteps == (801, 601, 401, 201, 1)  # the bundle's DDIM sampler, 5 steps
    assert p.depths == (1, 2)
    for d in p.depths:
        change, eps = p.row(d), p.row(d, "eps_error")
        assert change[0] is None and eps[0] is None
        assert all(v is not None and 0 < v < 10 and math.isfinite(v) for v in change[1:])
        assert all(v is not None and 0 < v < 10 for v in eps[1:])
    assert p.meta["prompts"] == 3 and p.meta["num_steps"] == 5


def test_measured_change_matches_a_direct_computation(tiny):
    """One prompt, no CFG: the hooks' number equals ‖h(1) − h(0)‖ / ‖h(0)‖ computed from two full calls."""
    cfg = CalibConfig(num_prompts=1, num_steps=2, num_bins=1, guidance_scale=1.0, batch_size=1)
    prof = measure_change(tiny, ["a red fox"], cfg, eps_error=(1,))
    from slimexport.calibrate.runner import initial_latents

    sched = tiny.make_scheduler()
    sched.set_timesteps(2)
    split = SplitUNet(tiny.unet, 1)
    cond = tiny.encoder.encode(["a red fox"])[0]
    x = initial_latents([0], (4, 16, 16), "cpu", torch.float32, sched.init_noise_sigma)
    with torch.no_grad():
        feats, outs, inputs = [], [], []
        for t in sched.timesteps:
            inputs.append((sched.scale_model_input(x, t), torch.full((1,), float(t))))
            eps, caches = split.full(*inputs[-1], cond, all_depths=True)
            feats.append(caches)
            outs.append(eps)
            x = sched.step(eps, t, x, return_dict=False)[0]
        shallow = split.shallow(*inputs[1], cond, feats[0][1])  # step 1 from step 0's depth-1 cache
    for d in (1, 2):
        want = float((feats[1][d] - feats[0][d]).norm() / feats[0][d].norm())
        assert prof.row(d)[1] == pytest.approx(want, rel=1e-4)
    want = float((shallow - outs[1]).norm() / outs[1].norm())
    assert prof.row(1, "eps_error")[1] == pytest.approx(want, rel=1e-4)
    assert prof.row(2, "eps_error")[1] is None  # the ε error was asked for at depth 1 only


def test_predicted_change_maps_by_timestep(tiny_profile):
    p = tiny_profile
    ts, c = p.timesteps, p.row(1)
    # on a calibration interval the prediction is the measurement; over several, their sum
    assert p.predicted(1, ts[1], ts[0]) == pytest.approx(c[1])
    assert p.predicted(1, ts[3], ts[0]) == pytest.approx(c[1] + c[2] + c[3])
    # half an interval: half its change; order does not matter
    mid = (ts[1] + ts[2]) / 2
    assert p.predicted(1, ts[1], mid) == pytest.approx(c[2] / 2)
    assert p.predicted(1, mid, ts[1]) == p.predicted(1, ts[1], mid)
    # beyond the calibrated range: the end rates, held
    assert p.predicted(1, 901, 801) == pytest.approx(c[1] / 2)
    assert p.predicted(1, 0, 1) == pytest.approx(c[4] / 200)
    assert p.predicted(1, 500, 500) == 0


def test_profile_round_trip_and_refusals(tiny_profile, tmp_path):
    path = tiny_profile.save(tmp_path / "change.json")
    back = ChangeProfile.load(path)
    assert back == tiny_profile
    with pytest.raises(ArtifactError):
        ChangeProfile.from_dict({**tiny_profile.to_dict(), "format": "other/1"})
    with pytest.raises(ArtifactError):
        ChangeProfile((1, 5), (1,), ((None, 0.1),), ((None, None),))  # increasing timesteps
    with pytest.raises(UsageError, match="depth 3 was not measured"):
        tiny_profile.row(3)


def test_collector_owns_its_hooks(tiny):
    unet = tiny.unet
    before = (len(unet._forward_pre_hooks), len(unet._forward_hooks), [len(b._forward_pre_hooks) for b in unet.up_blocks])
    with ChangeCollector(unet, 3):
        assert len(unet._forward_hooks) == before[1] + 1
    assert before == (len(unet._forward_pre_hooks), len(unet._forward_hooks), [len(b._forward_pre_hooks) for b in unet.up_blocks])


def test_measure_needs_two_steps_and_prompts(tiny):
    with pytest.raises(UsageError, match=">= 2 sampler steps"):
        measure_change(tiny, ["a"], CalibConfig(num_prompts=1, num_steps=1, num_bins=1))
    with pytest.raises(UsageError, match="no prompts"):
        measure_change(tiny, [], CalibConfig(num_prompts=1, num_steps=2, num_bins=1))
