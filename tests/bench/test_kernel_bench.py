"""slimexport.bench.kernel_bench: the CPU smoke run (references at tiny shapes) and a failing row."""

import json

import pytest
import torch

from slimexport.bench import kernel_bench


def test_cpu_smoke_run_writes_every_op(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU this is the full benchmark")
    path = tmp_path / "k.json"
    assert kernel_bench.main(["--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert [r["op"] for r in data["rows"]] == list(kernel_bench.OPS)
    assert all(r["torch_ms"] > 0 and r["triton_ms"] is None and not r["note"].startswith("FAILED") for r in data["rows"])
    assert "smoke run" in capsys.readouterr().out


def test_a_failing_case_is_a_row_not_a_crash():
    def broken(case, dtype, device):
        raise RuntimeError("out of resources")

    row = kernel_bench.measure_case("op", {"name": "x"}, broken, torch.float16, torch.device("cpu"), False)
    assert row["note"].startswith("FAILED RuntimeError: out of resources") and "traceback" in row


def test_cases_cover_the_sd14_shapes():
    for op, (cases, _) in kernel_bench.BENCHMARKS.items():
        full = cases([2, 8])
        assert len(full) == 2 * len(cases([2])) and len({c["name"] for c in full}) == len(full), op
    assert kernel_bench.parse_args(["--ops", "attn", "cov"]).ops == ["decoupled_attention", "cov_accumulate"]
