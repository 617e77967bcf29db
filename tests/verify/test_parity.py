"""The slim-vs-dense gate on a broken slim model: it must report the failure, not crash on it."""

import copy
import json

import torch

from slimexport.artifacts import write_json
from slimexport.config import VerifyConfig
from slimexport.report import make_report, render_markdown
from slimexport.verify import parity


def test_all_nan_slim_model_fails_the_gate_with_a_reason(tiny, tmp_path):
    slim = copy.deepcopy(tiny.unet).eval()
    with torch.no_grad():
        slim.conv_out.weight.fill_(float("nan"))
    cfg = VerifyConfig(timesteps=(500.0,), num_prompts=1, trajectory_steps=2)
    inputs = parity.fixed_inputs(tiny, cfg, (8, 8))
    res = parity.slim_vs_dense(tiny.unet.eval(), slim, tiny, inputs, cfg, (8, 8))
    assert not res["passed"] and {"finite", "latent_cosine"} <= set(res["failed"])
    assert res["trajectory"]["cosine"] is None and "final-latent cosine n/a" in res["reason"]
    plan = {"budget": 0.73, "params": {"dense_total": 2, "slim_total": 1, "targeted_dense": 2, "targeted_slim": 1}}
    md = render_markdown(make_report("tiny", plan, {"slim_vs_dense": res}, None, {}))
    assert "Verdict: FAILED" in md and "cosine – (gate" in md
    # report.json holds the NaN errors as null: re-rendering it (verify/bench of a folder) must work too
    rep = json.loads(write_json(tmp_path / "report.json", make_report("tiny", plan, {"slim_vs_dense": res}, None, {})).read_text())
    assert rep["parity"]["slim_vs_dense"]["eps_rel_error_mean"] is None
    assert "(mean –, gate" in render_markdown(rep)
