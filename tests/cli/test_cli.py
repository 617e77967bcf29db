import json

import pytest

from slimexport.cli.main import main

SMALL = ["--calib-prompts", "4", "--calib-steps", "4", "--calib-bins", "2", "--calib-batch", "2"]


def test_compress_command_end_to_end(tmp_path, capsys, monkeypatch):
    from slimexport.outdir import CACHE_ENV

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


def test_setting_errors_name_fields_in_python_and_flags_in_the_cli(capsys):
    """The Python API's setting errors speak of config fields; the CLI prints the flags that set them (one table)."""
    import torch

    from slimexport import api
    from slimexport.cli.options import as_flags
    from slimexport.errors import SettingError

    with pytest.raises(SettingError) as err:
        api.resolve_dtype("bf16", torch.device("cpu"))
    assert "CompressConfig.calib_dtype='bf16' on the CPU" in str(err.value) and "--" not in str(err.value)
    assert main(["compress", "--model", "tiny", "--device", "cpu", "--calib-dtype", "bf16"]) == 2
    assert ("error: --calib-dtype bf16 on the CPU is slow and imprecise; use --calib-dtype fp32 (or 'auto') on the CPU"
            in capsys.readouterr().err)
    assert (as_flags("ExportConfig.dtype='fp16' with BuildConfig.backend='torch'; lower the minimum of BuildConfig.batch")
            == "--dtype fp16 with --backend torch; lower the minimum of --batch")
    assert as_flags("VerifyConfig.atol=0.5, Other.field='x'") == "--atol 0.5, Other.field='x'"


def test_every_setting_an_error_names_has_a_flag():
    """Each ``Class.field`` in a SettingError's text anywhere in the package is in the CLI's flag table."""
    import ast
    import re
    from pathlib import Path

    import slimexport
    from slimexport.cli.options import CONFIG_FLAGS

    named = set()
    for path in Path(slimexport.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SettingError":
                text = " ".join(c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str))
                named |= {(m[1], m[2], path.name) for m in re.finditer(r"\b([A-Z]\w*Config)\.(\w+)", text)}
    assert len({n[2] for n in named}) >= 3, named  # api.py, engines/select.py, verify/run.py
    assert not {n for n in named if n[:2] not in CONFIG_FLAGS}


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


def test_dump_config_records_out_and_the_file_gives_it_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--model", "tiny", "--out", "rel/folder", "--dump-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["out"] == str(tmp_path / "rel" / "folder")  # absolute: the file works from any folder
    (tmp_path / "b.json").write_text(json.dumps(cfg))
    assert main(["build", "--config", "b.json", "--dump-config"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == cfg["out"]
    assert main(["build", "--config", "b.json", "--out", "other", "--dump-config"]) == 0  # the flag wins
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "other")
    assert main(["compress", "--model", "tiny", "--dump-config"]) == 0
    assert "out" not in json.loads(capsys.readouterr().out)  # none given: none recorded
