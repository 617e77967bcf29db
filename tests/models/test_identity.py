"""The model fingerprint keys every cached stage: it must change with whatever changes calibration's result."""

import dataclasses

import torch

from slimexport.models import load_model


def _fresh(bundle, **changes):
    return dataclasses.replace(bundle, fingerprint=None, **changes)


def test_identity_follows_weights_sampler_and_unet_config_not_the_path():
    b = load_model("digits")
    base = _fresh(b).identity()
    assert base == _fresh(b).identity() and not base.startswith("recipe:")
    assert _fresh(b, scheduler_config={**b.scheduler_config, "beta_schedule": "linear"}).identity() != base
    unet = b.unet
    unet.register_to_config(_name_or_path="/somewhere/else")  # where it was read from: not part of the identity
    assert _fresh(b).identity() == base
    unet.register_to_config(sample_size=unet.config.sample_size * 2)
    assert _fresh(b).identity() != base
    unet.register_to_config(sample_size=unet.config.sample_size // 2)
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    assert _fresh(b).identity() != base
