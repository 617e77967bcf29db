"""The default slim-vs-dense gate separates SlimDiff from the negative control on a trained model (digits), and
stays loose where the weights are random."""

import pytest

from slimexport.allocate.api import plan_ranks
from slimexport.calibrate import calibrate, select_prompts
from slimexport.config import AllocConfig, CalibConfig, DecomposeConfig, VerifyConfig
from slimexport.decompose.api import slim_unet
from slimexport.models.load import load_model
from slimexport.verify import parity


@pytest.fixture(scope="module")
def digits_run():
    bundle = load_model("digits")
    ccfg = CalibConfig(num_prompts=16, num_steps=4, num_bins=2)
    stats = calibrate(bundle, select_prompts(bundle, ccfg, device="cpu"), ccfg, progress=False)
    unet = bundle.unet.float().eval()
    hw = bundle.latent_size()
    vcfg = VerifyConfig()
    inputs = parity.fixed_inputs(bundle, vcfg, hw)

    def run(acfg, dcfg):
        plan = plan_ranks(unet, stats, dcfg, acfg, latent_hw=hw)
        slim, _ = slim_unet(unet, stats, plan, dcfg, progress=False)
        return parity.slim_vs_dense(unet, slim, bundle, inputs, vcfg, hw)

    return run


@pytest.mark.slow
def test_slimdiff_passes_and_random_selection_fails_the_default_gate(digits_run):
    ok = digits_run(AllocConfig(budget=0.73), DecomposeConfig())
    assert ok["passed"], ok["reason"]
    assert ok["gate"]["basis"].startswith("trained weights") and ok["gate"] == {**parity.TRAINED_GATE, "basis": ok["gate"]["basis"]}
    bad = digits_run(AllocConfig(budget=0.73, method="uniform"), DecomposeConfig(qkvo_method="random", ffn_selection="random"))
    assert not bad["passed"] and "eps_error" in bad["failed"], bad


def test_random_weights_get_the_loose_gate_and_flags_win(tiny):
    cfg, basis = parity.default_gate(VerifyConfig(), tiny)
    assert (cfg.max_eps_error, cfg.min_latent_cosine) == (0.5, 0.8) and basis.startswith("random weights")
    cfg, basis = parity.default_gate(VerifyConfig(max_eps_error=0.1, min_latent_cosine=0.9), load_model("digits"))
    assert (cfg.max_eps_error, cfg.min_latent_cosine, basis) == (0.1, 0.9, "set")
