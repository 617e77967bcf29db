"""report.json → report.md: the verdict, the budget kept, the speed-up with its interval, the gates' basis."""

from slimexport.report import budget_kept, make_report, render_markdown

PLAN = {"budget": 0.73, "scope": "targeted", "metric": "params", "targets": ["attn", "ffn"],
        "allocation": {"method": "greedy", "metric": "params", "targeted_budget": 0.73, "target": 730.0, "kept": 728.0},
        "params": {"dense_total": 2000, "slim_total": 1728, "targeted_dense": 1000, "targeted_slim": 728}}
SVD = {"passed": False, "reason": "mean relative ε error 0.05 > 0.03", "eps_rel_error": {"500.0": 0.05},
       "eps_rel_error_mean": 0.05, "gate": {"max_eps_error": 0.03, "min_latent_cosine": 0.97,
                                             "basis": "trained weights: measured default"},
       "trajectory": {"steps": 10, "guidance_scale": 5.0, "rel_error": 0.3, "cosine": 0.95}}
SPEED = {"backend": "onnxruntime", "device": "cpu", "iterations": 40, "warmup": 5, "speedup": 1.25,
         "speedup_ci95": [1.2, 1.3], "dense_ms": {"p50": 10.0, "p90": 11.0, "p99": 12.0},
         "slim_ms": {"p50": 8.0, "p90": 9.0, "p99": 9.5}}


def test_a_failed_gate_reads_as_failed_with_its_reason_and_basis():
    rep = make_report("digits", PLAN, {"slim_vs_dense": SVD}, SPEED, {"load": {"seconds": 1.0, "cached": False}})
    assert not rep["passed"] and abs(budget_kept(PLAN)["kept"] - 0.728) < 1e-12
    md = render_markdown(rep)
    assert "**Verdict: FAILED**" in md and "mean relative ε error 0.05 > 0.03" in md
    assert "gates: trained weights: measured default" in md
    assert "1.250× (95% interval 1.200–1.300)" in md and "0.728 of the targeted parameters kept" in md
