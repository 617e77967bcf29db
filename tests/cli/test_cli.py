import json

import pytest

from slimexport.cli.main import main

SMALL = ["--calib-prompts", "4", "--calib-steps", "4", "--calib-bins", "2", "--calib-batch", "2"]


def test_compress_command_end_to_end(tmp_path, capsys, monkeypatch):
    from slimexport.api import CACHE_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "shared-cache"))
    rc = main(["-q", "compress", "--model", "tiny", "--budget", "0.73", "--out", str(tmp_path / "o"), *SMALL])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "targeted parameters" in out and (tmp_path / "o" / "slim_unet" / "slim_plan.json").exists()
    assert any((tmp_path / "shared-cache").iterdir()) and not (tmp_path / "engines").exists()  # the cache went where asked


@pytest.mark.parametrize("extra, of", [
    ([], "targeted parameters"),
    (["--budget-metric", "macs"], "targeted MACs"),
    (["--targets", "attn,ffn,resnet", "--budget-scope", "unet", "--budget-metric", "macs"], "whole-UNet MACs"),
    (["--targets", "attn,ffn,resnet", "--budget-scope", "unet", "--budget", "0.9"], "whole-UNet parameters"),
])
def test_compress_says_what_the_budget_counts_and_what_was_kept(tmp_path, capsys, monkeypatch, extra, of):
    """The budget is compared with the count it limits (it was printed beside the targeted-parameter ratio)."""
    import re

    monkeypatch.chdir(tmp_path)
    args = ["-q", "compress", "--model", "tiny", "--budget", "0.73", *SMALL, *extra, "--out", str(tmp_path / "o")]
    assert main(args) == 0
    out = capsys.readouterr().out
    budget = float(args[args.index("--budget", 5) + 1]) if "--budget" in extra else 0.73
    m = re.search(rf"budget {budget:g} of the {of}: (\d\.\d+) kept", out)
    assert m and abs(float(m.group(1)) - budget) < 0.01, out


def test_dump_config_roundtrip(tmp_path, capsys):
    assert main(["compress", "--model", "tiny", "--temperature", "inf", "--targets", "ffn", "--dump-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["alloc"]["temperature"] == "inf" and cfg["alloc"]["targets"] == ["ffn"]
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    assert main(["compress", "--config", str(p), "--budget", "0.5", "--dump-config"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["alloc"]["budget"] == 0.5 and again["alloc"]["targets"] == ["ffn"]


def test_local_paths_are_recorded_absolute(tmp_path, capsys, monkeypatch):
    """A relative --model or --prompts path works from any folder (verify/bench of the build, a dumped config)."""
    (tmp_path / "pipe").mkdir()
    (tmp_path / "tiny").mkdir()  # a folder named like a registry model: the name still means the registry model
    (tmp_path / "p.txt").write_text("a prompt\n")
    monkeypatch.chdir(tmp_path)
    assert main(["compress", "--model", "pipe", "--prompts", "p.txt", "--dump-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"] == str((tmp_path / "pipe").resolve()) and cfg["calib"]["prompts_file"] == str((tmp_path / "p.txt").resolve())
    assert main(["compress", "--model", "tiny", "--prompts", "missing.txt", "--dump-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"] == "tiny" and cfg["calib"]["prompts_file"] == "missing.txt"  # left for the loader's error
    (tmp_path / "sd14").mkdir()  # a registry model without built-in weights: load_model reads the folder first...
    assert main(["compress", "--model", "sd14", "--dump-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str((tmp_path / "sd14").resolve())
    assert main(["compress", "--model", "sd14", "--random-weights", "--dump-config"]) == 0  # ...unless random weights
    assert json.loads(capsys.readouterr().out)["model"] == "sd14"


@pytest.mark.parametrize("args, code, pattern", [
    (["compress", "--model", "tiny", "--budget", "0"], 2, "budget"),
    (["compress", "--model", "tiny", "--budget", "1.5"], 2, "budget"),
    (["compress", "--model", "tiny", "--budget", "abc"], 2, "budget"),
    (["compress", "--model", "tiny", "--targets", "resnets"], 2, "targets"),
    (["compress", "--model", "tiny", "--temperature", "-1"], 2, "temperature"),
    (["compress", "--model", "tiny", "--calib-steps", "0"], 2, "num_steps"),
    (["compress", "--model", "tiny", "--calib-bins", "9", "--calib-steps", "4"], 2, "num_bins"),
    (["compress", "--model", "tiny", "--calib-size", "30"], 2, "multiple of 8"),
    (["compress", "--model", "nope-model"], 2, "neither a registry name"),
    (["compress", "--model", "sd14"], 2, "random-weights"),
    (["compress", "--model", "tiny", "--device", "tpu"], 2, "device"),
    (["compress", "--model", "tiny", "--config", "/nonexistent.json"], 2, "does not exist"),
])
def test_bad_input_exit_codes(args, code, pattern, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    msg = captured.err + captured.out
    assert rc == code, msg
    assert pattern.lower() in msg.lower()
    assert "Traceback" not in msg


def test_config_errors_name_the_flag(capsys):
    """A rejected field names the flag that sets it, and every flag in the table is one of build's options."""
    from slimexport.cli.main import build as build_command
    from slimexport.cli.options import CONFIG_FLAGS

    options = {o for p in build_command.params for o in p.opts}
    assert set(CONFIG_FLAGS.values()) <= options, set(CONFIG_FLAGS.values()) - options
    for args, line in ((["compress", "--model", "tiny", "--budget", "0"], "AllocConfig.budget=0.0 is invalid (flag --budget); expected"),
                       (["build", "--model", "tiny", "--iterations", "0"], "BenchConfig.iterations=0 is invalid (flag --iterations)"),
                       (["compress", "--model", "tiny", "--calib-steps", "4", "--calib-bins", "9"], "(flag --calib-bins)")):
        assert main(args) == 2
        assert line in capsys.readouterr().err
