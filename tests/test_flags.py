"""One table of settings: the CLI's options and the Python API's keywords are the same names, applied alike."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from slimexport.cli.main import build as build_command
from slimexport.cli.main import cli
from slimexport.cli.main import compress as compress_command
from slimexport.config import BuildConfig, CompressConfig
from slimexport.errors import ConfigError, UsageError
from slimexport.flags import CONFIG_FLAGS, FLAGS, apply_flags, build_config, flag_name

NOT_SETTINGS = {"config_file", "dump_config", "out", "speedup"}  # arguments of the commands, not config fields


def _dests(command) -> dict[str, str]:
    return {p.name: p.opts[0] for p in command.params if p.name not in NOT_SETTINGS}


def test_every_build_option_is_a_keyword_of_the_same_name_and_back():
    dests = _dests(build_command)
    assert set(dests) == set(FLAGS) | {"preset"}  # preset: a named set of the others
    for name, opt in dests.items():
        assert opt == flag_name(name)
    compress_keys = {k for k, f in FLAGS.items() if not f.build_only}
    assert set(_dests(compress_command)) == compress_keys | {"preset"}


def test_keywords_and_flags_give_the_same_config():
    argv = ["--model", "tiny", "--budget", "0.6", "--allocation", "greedy", "--targets", "attn,ffn,resnet",
            "--temperature", "inf", "--calib-prompts", "16", "--calib-steps", "3", "--height", "128,256,384",
            "--cache", "auto", "--cache-depth", "2", "--backend", "openvino", "--dtype", "bf16", "--iterations", "7",
            "--max-eps-error", "0.2", "--bench-target-ci", "0.05", "--no-figures"]
    out = CliRunner().invoke(cli, ["build", *argv, "--dump-config"])
    assert out.exit_code == 0, out.output
    from_cli = BuildConfig.from_dict(json.loads(out.output))
    from_api = build_config(model="tiny", budget=0.6, allocation="greedy", targets="attn,ffn,resnet", temperature="inf",
                            calib_prompts=16, calib_steps=3, height="128,256,384", cache="auto", cache_depth=2,
                            backend="openvino", dtype="bf16", iterations=7, max_eps_error=0.2, bench_target_ci=0.05,
                            figures=False)
    assert from_api == from_cli
    assert from_api.compress.alloc.temperature == math.inf and from_api.compress.calib.num_bins == 3  # one bin per step
    assert from_api.height == (128, 256, 384) and from_api.cache.mode == "auto" and from_api.figures is False


def test_keywords_override_a_config_and_none_means_not_given():
    base = build_config(budget=0.5, iterations=9)
    cfg = apply_flags(base, {"budget": 0.8, "iterations": None, "calib_size": 128})
    assert cfg.compress.alloc.budget == 0.8 and cfg.bench.iterations == 9
    assert cfg.compress.calib.height == cfg.compress.calib.width == 128
    assert apply_flags(base, {}) is base


def test_compress_takes_the_compress_keywords_only():
    cfg = apply_flags(CompressConfig(), {"budget": 0.6, "qkvo_method": "random"})
    assert isinstance(cfg, CompressConfig) and cfg.alloc.budget == 0.6 and cfg.decompose.qkvo_method == "random"
    with pytest.raises(UsageError, match=r"backend= \(--backend\) is a build setting"):
        apply_flags(CompressConfig(), {"backend": "torch"})


def test_bad_keywords_and_values_are_one_line_errors():
    with pytest.raises(UsageError, match="did you mean allocation="):
        build_config(alocation="greedy")
    with pytest.raises(ConfigError, match=r"AllocConfig\.budget=2"):
        build_config(budget=2)
    with pytest.raises(UsageError, match="--cache 'fast' is not auto, off or an interval"):
        build_config(cache="fast")


def test_api_functions_take_the_keywords(tmp_path, monkeypatch):
    """``slimexport.build`` and ``compress`` apply their keywords before any work (a bad one fails at once)."""
    import slimexport

    with pytest.raises(UsageError, match="did you mean calib_prompts="):
        slimexport.build(calib_promts=4, out=tmp_path / "b")
    with pytest.raises(UsageError, match="is a build setting"):
        slimexport.compress(model="tiny", backend="torch", out=tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_every_config_field_a_flag_sets_is_named_once():
    flags = {}
    for key, f in FLAGS.items():
        for path in f.paths:
            assert path not in flags, f"{path} set by {flags.get(path)} and {key}"
            flags[path] = key
    assert CONFIG_FLAGS[("AllocConfig", "method")] == "--allocation"
    assert CONFIG_FLAGS[("CalibConfig", "height")] == CONFIG_FLAGS[("CalibConfig", "width")] == "--calib-size"


def test_the_paper_preset_sets_the_papers_method_and_flags_override_it():
    from slimexport.flags import PRESETS

    cfg = build_config(allocation="greedy", targets="attn,ffn,resnet", budget_metric="macs", calib_prompts=8)
    paper = apply_flags(cfg, {"preset": "paper"})
    a = paper.compress.alloc
    assert (a.method, a.targets, a.metric, a.temperature) == ("softmax", ("attn", "ffn"), "params", 1.0)
    assert paper.compress.calib.num_prompts == 500 and paper.compress.calib.num_steps == 25
    mixed = build_config(preset="paper", allocation="greedy", calib_steps=2)
    assert mixed.compress.alloc.method == "greedy" and mixed.compress.alloc.targets == ("attn", "ffn")
    assert mixed.compress.calib.num_bins == 2  # the preset's 5 bins lowered to one per step
    with pytest.raises(UsageError, match="unknown preset 'fast'; use one of paper"):
        build_config(preset="fast")
    out = CliRunner().invoke(cli, ["compress", "--preset", "paper", "--budget", "0.5", "--dump-config"])
    assert out.exit_code == 0, out.output
    dumped = CompressConfig.from_dict(json.loads(out.output))
    assert dumped.alloc.budget == 0.5 and dumped.alloc.method == PRESETS["paper"]["allocation"]
