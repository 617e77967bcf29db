"""The report's figures are real PNGs of the data given, and report.html embeds them (no network assets)."""

import re

import pytest
import torch

pytest.importorskip("matplotlib")

from slimexport import figures  # noqa: E402
from slimexport.report import render_html, render_markdown, write_report  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000, path
    return data


def test_each_figure_is_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    plan = {"budget": 0.73, "allocation": {"method": "softmax"}, "modules": {
        "down.0.tb.0.attn1.qk": {"kind": "attn1.qk", "rank": 4, "max_rank": 8},
        "down.0.tb.0.ff": {"kind": "ff", "rank": 32, "max_rank": 64},
        "up.1.tb.0.ff": {"kind": "ff", "rank": 64, "max_rank": 64}}}
    speed = {"backend": "onnxruntime", "device": "cpu", "dense_ms": {"p50": 2.0, "p90": 2.5, "p99": 3.0},
             "slim_ms": {"p50": 1.5, "p90": 1.8, "p99": 2.0}}
    made = [
        figures.image_grid_figure(dense, dense + 0.1, tmp_path / "a.png", labels=["0", "1", "2"]),
        figures.latent_stats_figure(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), tmp_path / "b.png"),
        figures.ranks_figure(plan, tmp_path / "c.png"),
        figures.eps_per_timestep_figure({"eps_rel_error": {"100.0": 0.01, "500.0": 0.02}, "gate": {"max_eps_error": 0.03}},
                                        tmp_path / "d.png"),
        figures.trajectory_cosine_figure([0.99, 0.98, 0.97], [900, 500, 100], tmp_path / "e.png"),
        figures.latency_figure(speed, tmp_path / "f.png"),
    ]
    assert [_png(p) for p in made]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporaries left


def test_different_data_draw_different_pictures(tmp_path):
    a = torch.zeros(1, 1, 8, 8)
    figures.image_grid_figure(a, a, tmp_path / "same.png")
    figures.image_grid_figure(a, a + 1, tmp_path / "other.png")
    assert _png(tmp_path / "same.png") != _png(tmp_path / "other.png")


def _report(figs):
    return {"model": "digits", "budget": 0.73, "budget_scope": "targeted", "passed": True, "targets": ["attn", "ffn"],
            "params": {"dense_total": 10, "slim_total": 8, "targeted_dense": 5, "targeted_slim": 3},
            "parity": {"slim_vs_dense": {"passed": True, "cosine": 0.99}}, "speed": None,
            "stages": {"load": {"seconds": 1.0, "cached": False}}, "figures": figs}


def test_report_html_embeds_figures_offline(tmp_path):
    (tmp_path / "figures").mkdir()
    figures.latency_figure({"dense_ms": {"p50": 2, "p90": 3, "p99": 4}, "slim_ms": {"p50": 1, "p90": 2, "p99": 3}},
                           tmp_path / "figures" / "latency.png")
    rep = _report({"latency": "figures/latency.png"})
    md = render_markdown(rep)
    assert "![" in md and "figures/latency.png" in md
    write_report(tmp_path, rep)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing to fetch
    assert "<table>" in page and "<strong>Verdict: PASSED</strong>" in page


def test_report_without_figures_has_no_figure_section(tmp_path):
    md = render_markdown(_report({}))
    assert "## Figures" not in md
    assert "<img" not in render_html(md, tmp_path)


def test_digits_figures_show_images_and_a_faithful_trajectory(tmp_path):
    """digits' latents are its pixels: the grid shows images; the same UNet twice keeps cosine 1 at every step."""
    from slimexport.config import VerifyConfig
    from slimexport.models.load import load_model

    bundle = load_model("digits")
    unet = bundle.unet.eval()
    plan = {"budget": 1.0, "modules": {"mid_block.attentions.0.transformer_blocks.0.ff": {"kind": "ff", "rank": 8, "max_rank": 8}}}
    parity = {"slim_vs_dense": {"eps_rel_error": {"500.0": 0.0}, "gate": {"max_eps_error": 0.5}}}
    figs = figures.make_figures(tmp_path, plan, parity, None, bundle, unet, unet, VerifyConfig(trajectory_steps=3), (16, 16))
    assert set(figs) == {"samples", "ranks", "eps_per_timestep", "trajectory_cosine"}  # no bench: no latency figure
    tr = figures.trajectories(bundle, unet, unet, 2, 3, 5.0, 0, (16, 16))
    assert len(tr["cosine"]) == 3 and all(abs(c - 1) < 1e-6 for c in tr["cosine"])
    assert len(set(tr["prompts"])) == 2
