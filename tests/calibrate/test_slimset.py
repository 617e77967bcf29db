import pytest
import torch

from slimexport.calibrate.prompts import read_prompts_file, shipped_pool
from slimexport.calibrate.slimset import farthest_point_sampling, geometric_median, select, select_grouped
from slimexport.errors import UsageError


def test_geometric_median_is_robust_to_an_outlier():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    mu = geometric_median(pts)
    assert float(mu.norm()) < 2.0  # the mean would be at (20.4, 20.4)
    # first-order optimality: the sum of unit vectors towards the points is ~0
    d = pts.double() - mu
    assert float((d / d.norm(dim=1, keepdim=True)).sum(0).norm()) < 1e-3


def test_fps_picks_distinct_spread_points():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64), dim=1)
    assert farthest_point_sampling(e, 3, 0) == [0, 3, 2]


def test_select_grouped_fills_quotas():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(40, 8, generator=g)
    groups = ["low_f"] * 10 + ["high_f"] * 30
    idx = select_grouped(e, groups, 12)
    assert len(idx) == len(set(idx)) == 12
    assert sum(groups[i] == "low_f" for i in idx) == 6
    assert len(select(e, 50)) == 40


def test_shipped_pool_is_large_and_tagged():
    prompts, tags = shipped_pool()
    assert len(prompts) >= 1000 and len(set(prompts)) == len(prompts)
    assert set(tags) == {"low_f", "high_f"}


def test_prompts_file_reading(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# comment\na cat\n\na cat\na dog\n")
    assert read_prompts_file(p) == ["a cat", "a dog"]
    p.write_bytes("\ufeffa bom prompt\nanother\n".encode())  # as Windows editors save UTF-8
    assert read_prompts_file(p) == ["a bom prompt", "another"]
    p.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(UsageError, match=r"is not UTF-8 text \(byte 3\)"):
        read_prompts_file(p)
    p.write_bytes("\ufeffok\n".encode() + b"\xff\n")  # offsets count the byte-order mark too
    with pytest.raises(UsageError, match=r"is not UTF-8 text \(byte 6\)"):
        read_prompts_file(p)
