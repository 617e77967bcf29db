"""The quality harness without compressing anything: its rows, option checks and the report from recorded results."""

import json
import shutil
from pathlib import Path

import pytest

from slimexport.errors import UsageError
from slimexport.harness import eval_quality as eq

RECORDED = Path(__file__).resolve().parents[2] / "docs" / "quality"


def test_rows_and_defaults(tmp_path):
    args = eq.parse_args(["--groups", "main", "--budgets", "0.9,0.73", "--methods", "slimdiff,plain_svd"], root=tmp_path)
    assert args.out == tmp_path / "docs" / "quality" and args.work == tmp_path / "engines" / "quality"
    rows = eq.make_rows(args, pool_size=400)
    assert [r["id"] for r in rows] == ["dense", "slimdiff@0.73", "plain_svd@0.73", "slimdiff@0.9", "plain_svd@0.9"]
    plain = rows[2]["compress"]
    assert plain.alloc.budget == 0.73 and plain.alloc.method == "uniform" and plain.decompose.qkvo_method == "weight"
    assert eq.wants_samples(rows[1], "target") and not eq.wants_samples(rows[3], "target")
    assert eq.trajectory_labels(args).tolist() == list(range(10))


def test_bad_sample_count_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="multiple of 10"):
        eq.main(["--samples", "25", "--out", str(tmp_path)])


def test_report_only_rewrites_the_recorded_report(tmp_path):
    if not (RECORDED / "results.json").exists():
        pytest.skip("no recorded results in docs/quality")
    pytest.importorskip("matplotlib")
    for name in ("results.json", "results.md"):
        shutil.copy(RECORDED / name, tmp_path / name)
    assert eq.main(["--report-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    for heading in ("## Target (issue 4)", "## Budgets × methods", "## Compact table (budgets × methods)", "## Reading"):
        assert heading in md, heading
    recorded = (RECORDED / "results.md").read_text()
    assert md.split("## Reading", 1)[1] == recorded.split("## Reading", 1)[1]  # the hand-written reading is kept
    assert json.loads((tmp_path / "results.json").read_text())["rows"]
    assert (tmp_path / "quality_vs_params.png").stat().st_size > 0
