"""A user's mistakes, table-driven: every row asserts the exit code (or error class), a fragment of the one-line
message that names the field/value/fix, and that no traceback is printed. Rows already in tests/cli/test_cli.py,
tests/test_api.py, tests/test_build.py and tests/models/test_load.py are not repeated here.

Usage errors exit 2, failed runs (disk full, NaN statistics) exit 1; ``--debug`` shows the traceback."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pathlib

import numpy as np
import pytest
import torch
from _rel_helpers import FAST_BENCH, SMALL

from slimexport import api
from slimexport.cli.main import main
from slimexport.errors import (
    ArtifactError,
    ConfigError,
    IncompatibleArtifactError,
    MissingExtraError,
    ModelNotFoundError,
    NumericalError,
    ResourceError,
    SettingError,
    SlimExportError,
    UsageError,
)
from slimexport.models.load import load_model


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Bad files and folders, made once: ``{name: path}`` for the ``{name}`` placeholders of the CLI table."""
    from slimexport.models.load import build_unet
    from slimexport.models.registry import TINY_UNET

    root = tmp_path_factory.mktemp("bad-inputs")
    p = {"root": root}
    unet = build_unet(TINY_UNET)
    config = json.loads(json.dumps(dict(unet.config), default=list))

    p["unet_bin"] = root / "unet_bin"  # pickled weights only
    unet.save_pretrained(p["unet_bin"], safe_serialization=False)
    p["pipe_noweights"] = root / "pipe_noweights"  # a pipeline whose unet/ has a config and no weights
    (p["pipe_noweights"] / "unet").mkdir(parents=True)
    (p["pipe_noweights"] / "model_index.json").write_text("{}")
    (p["pipe_noweights"] / "unet" / "config.json").write_text(json.dumps(config))
    p["unet_badweights"] = root / "unet_badweights"  # a config and a .safetensors file that is not one
    p["unet_badweights"].mkdir()
    (p["unet_badweights"] / "config.json").write_text(json.dumps(config))
    (p["unet_badweights"] / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 64)
    p["unet_badconfig"] = root / "unet_badconfig"  # config.json that is not JSON
    p["unet_badconfig"].mkdir()
    (p["unet_badconfig"] / "config.json").write_text("{not json")
    (p["unet_badconfig"] / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    p["unet_nan"] = root / "unet_nan"  # a UNet whose mid-block GEGLU weights hold NaN
    nan_unet = build_unet(TINY_UNET)
    with torch.no_grad():
        nan_unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj").weight[0, 0] = math.nan
    nan_unet.save_pretrained(p["unet_nan"], safe_serialization=True)
    p["slim_like"] = root / "slim_like"  # a slim UNet folder passed as the dense model
    p["slim_like"].mkdir()
    (p["slim_like"] / "slim_plan.json").write_text("{}")
    p["empty_dir"] = root / "empty_dir"
    p["empty_dir"].mkdir()
    p["a_file"] = root / "a_file.txt"
    p["a_file"].write_text("not a folder\n")
    p["foreign_dir"] = root / "foreign_dir"  # someone's project folder passed as --out
    p["foreign_dir"].mkdir()
    (p["foreign_dir"] / "notes.txt").write_text("mine\n")

    p["prompts_empty"] = root / "prompts_empty.txt"
    p["prompts_empty"].write_text("\n   \n# a comment only\n")
    p["prompts_binary"] = root / "prompts_binary.txt"
    p["prompts_binary"].write_bytes(b"\xff\xfe\x00\x9c\x80binary\x00" * 8)
    p["prompts_long"] = root / "prompts_long.txt"
    p["prompts_long"].write_text("a red fox\n" + "x" * 5000 + "\n")
    p["prompts_dir"] = root / "prompts_dir"
    p["prompts_dir"].mkdir()

    def cfg(name, text: str | bytes):
        f = root / f"{name}.json"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        p[name] = f

    cfg("cfg_badjson", '{"alloc": {"budget": 0.5,}}')
    cfg("cfg_unknown", '{"modle": "tiny"}')
    cfg("cfg_nested_unknown", '{"alloc": {"budgett": 0.5}}')
    cfg("cfg_nested_number", '{"alloc": 5}')
    cfg("cfg_wrong_type", '{"calib": {"num_prompts": "4"}}')
    cfg("cfg_bool_text", '{"random_weights": "yes"}')
    cfg("cfg_prompts_number", '{"calib": {"prompts_file": 5}}')
    cfg("cfg_version", '{"version": 99}')
    cfg("cfg_list", "[1, 2]")
    cfg("cfg_binary", b"\xff\xfe{\x00}")
    from slimexport.config import BuildConfig

    cfg("cfg_build_for_compress", json.dumps(BuildConfig().to_dict()))  # a build config given to compress
    p["cfg_dir"] = root / "cfg_dir"
    p["cfg_dir"].mkdir()

    p["compress_only"] = root / "compress_only"  # a folder with a manifest but no finished build
    p["compress_only"].mkdir()
    from slimexport._version import __version__
    from slimexport.cache import MANIFEST_FORMAT

    (p["compress_only"] / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "slimexport_version": __version__,
                                                                  "stages": {}}))
    return p


C = ["compress", "--model", "tiny", *SMALL]
B = ["build", "--model", "tiny", *SMALL, *FAST_BENCH]

# (id, argv with {placeholders} from ``paths``, exit code, message fragment)
CLI_ROWS = [
    # budgets
    ("budget-negative", [*C, "--budget", "-0.5"], 2, "AllocConfig.budget=-0.5"),
    ("budget-nan", [*C, "--budget", "nan"], 2, "AllocConfig.budget=nan"),
    ("budget-inf", [*C, "--budget", "inf"], 2, "AllocConfig.budget=inf"),
    ("budget-empty-text", [*C, "--budget", ""], 2, "'--budget'"),
    ("budget-over-one-build", [*B, "--budget", "2"], 2, "expected a number in (0, 1]"),
    ("temperature-nan", [*C, "--temperature", "nan"], 2, "temperature"),
    ("temperature-text", [*C, "--temperature", "warm"], 2, "is not a number"),
    ("targets-empty", [*C, "--targets", ","], 2, "comma-separated subset"),
    ("targets-twice", [*C, "--targets", "attn,attn"], 2, "names a target twice"),
    ("r-min-zero", [*C, "--r-min", "0"], 2, "AllocConfig.r_min=0"),
    ("attn-quantum-zero", [*C, "--attn-quantum", "0"], 2, "attn_quantum"),
    ("ridge-zero", [*C, "--ridge", "0"], 2, "DecomposeConfig.ridge=0"),
    ("ridge-one", [*C, "--ridge", "1"], 2, "a number in (0, 1)"),
    ("guidance-below-one", [*C, "--guidance", "0.5"], 2, "guidance_scale=0.5"),
    ("calib-prompts-zero", [*C, "--calib-prompts", "0"], 2, "num_prompts=0"),
    ("calib-batch-zero", [*C, "--calib-batch", "0"], 2, "batch_size=0"),
    ("seed-negative", [*C, "--seed", "-1"], 2, "seed=-1"),
    ("unknown-option", [*C, "--budgett", "0.5"], 2, "No such option"),
    # models
    ("model-pickled-bin-only", ["compress", "--model", "{unet_bin}", *SMALL], 2, "pickled .bin files are never loaded"),
    ("model-missing-weights", ["compress", "--model", "{pipe_noweights}", *SMALL], 2, "has no .safetensors weights"),
    ("model-unreadable-weights", ["compress", "--model", "{unet_badweights}", *SMALL], 2, "cannot load UNet2DConditionModel"),
    ("model-bad-config-json", ["compress", "--model", "{unet_badconfig}", *SMALL], 2, "not a valid JSON"),
    ("model-not-diffusers", ["compress", "--model", "{empty_dir}", *SMALL], 2, "is not a diffusers folder"),
    ("model-is-a-file", ["compress", "--model", "{a_file}", *SMALL], 2,
     "pass a .safetensors checkpoint or a diffusers folder"),
    ("model-slim-folder", ["compress", "--model", "{slim_like}", *SMALL], 2, "is a slim UNet folder"),
    ("model-random-weights-unknown", ["compress", "--model", "nope", "--random-weights"], 2, "needs a registry name"),
    ("model-hub-id-offline", ["compress", "--model", "owner/no-such-model"], 2, "not in the local Hugging Face cache"),
    ("model-nan-weights", ["compress", "--model", "{unet_nan}", "--out", "{root}/nan-out", *SMALL], 1,
     "NaN/Inf in the activations of mid_block.attentions.0.transformer_blocks.0.ff at step 0 (timestep bin 0)"),
    # paths
    ("out-is-a-file", [*C, "--out", "{a_file}"], 2, "is a file"),
    ("out-under-a-file", [*C, "--out", "{a_file}/sub"], 2, "is a file"),
    ("build-out-is-a-file", [*B, "--out", "{a_file}"], 2, "pass an --out path that is a folder"),
    ("out-is-someone-elses-folder", [*C, "--out", "{foreign_dir}"], 2, "holds files slimexport did not write (notes.txt)"),
    ("build-out-is-someone-elses-folder", [*B, "--out", "{foreign_dir}"], 2, "pass a new or empty --out folder"),
    # prompts files
    ("prompts-missing", [*C, "--prompts", "{root}/no-such-prompts.txt"], 2, "does not exist"),
    ("prompts-empty", [*C, "--prompts", "{prompts_empty}"], 2, "has no prompts"),
    ("prompts-binary", [*C, "--prompts", "{prompts_binary}"], 2, "is not UTF-8 text"),
    ("prompts-directory", [*C, "--prompts", "{prompts_dir}"], 2, "is a folder"),
    ("prompts-line-too-long", [*C, "--prompts", "{prompts_long}"], 2, "has a line of 5000 characters"),
    # dtypes and devices
    ("dtype-int8", [*B, "--dtype", "int8"], 2, "'int8' is not one of"),
    ("dtype-fp16-torch-cpu", [*B, "--dtype", "fp16", "--backend", "torch", "--engine-device", "cpu", "--out", "{root}/never"], 2,
     "--dtype fp16 with --backend torch runs on a GPU only"),
    ("calib-dtype-fp16-cpu", [*C, "--device", "cpu", "--calib-dtype", "fp16"], 2, "--calib-dtype fp16 on the CPU"),
    ("calib-dtype-bf16-cpu", [*C, "--device", "cpu", "--calib-dtype", "bf16"], 2, "use --calib-dtype fp32"),
    pytest.param("device-cuda-without-gpu", [*C, "--device", "cuda"], 2, "no CUDA GPU is visible", marks=NO_CUDA),
    pytest.param("engine-device-cuda-without-gpu", [*B, "--engine-device", "cuda", "--out", "{root}/never"], 2,
                 "--engine-device cuda asked for", marks=NO_CUDA),
    ("device-bad-index", [*C, "--device", "cuda:x"], 2, "CompressConfig.device='cuda:x' is invalid"),
    ("engine-device-typo", [*B, "--engine-device", "cudafoo"], 2, "BuildConfig.engine_device='cudafoo' is invalid"),
    ("backend-unknown", [*B, "--backend", "ncnn"], 2, "'ncnn' is not one of"),
    # engine profile and export options (all refused before calibration starts)
    ("opset-16", [*B, "--opset", "16"], 2, "ExportConfig.opset=16"),
    ("batch-not-ordered", [*B, "--batch", "4,2,1"], 2, "min <= opt <= max"),
    ("batch-text", [*B, "--batch", "two"], 2, "expected N or MIN,OPT,MAX"),
    ("height-not-multiple", [*B, "--height", "30", "--out", "{root}/never"], 2, "pass a height that is a multiple of 4"),
    ("height-too-small", [*B, "--height", "4"], 2, "BuildConfig.height=(4, 4, 4)"),
    ("iterations-zero", [*B, "--iterations", "0"], 2, "BenchConfig.iterations=0"),
    ("warmup-negative", [*B, "--warmup", "-1"], 2, "BenchConfig.warmup=-1"),
    ("optimization-level-9", [*B, "--optimization-level", "9"], 2, "an integer in [0, 5]"),
    ("atol-negative", [*B, "--atol", "-1"], 2, "VerifyConfig.atol=-1"),
    ("max-eps-error-zero", [*B, "--max-eps-error", "0"], 2, "max_eps_error"),
    ("min-latent-cosine-two", [*B, "--min-latent-cosine", "2"], 2, "a number in [-1, 1]"),
    # config files
    ("config-bad-json", [*C, "--config", "{cfg_badjson}"], 2, "is not valid JSON"),
    ("config-unknown-key", ["compress", "--config", "{cfg_unknown}"], 2, "CompressConfig has no field(s) modle"),
    ("config-nested-unknown-key", ["compress", "--config", "{cfg_nested_unknown}"], 2, "AllocConfig has no field(s) budgett"),
    ("config-nested-number", ["compress", "--config", "{cfg_nested_number}"], 2, "CompressConfig.alloc=5"),
    ("config-wrong-type", ["compress", "--config", "{cfg_wrong_type}"], 2, "CalibConfig.num_prompts='4'"),
    ("config-bool-as-text", ["compress", "--config", "{cfg_bool_text}"], 2, "CompressConfig.random_weights='yes'"),
    ("config-prompts-file-number", ["compress", "--config", "{cfg_prompts_number}"], 2, "CalibConfig.prompts_file=5"),
    ("config-version", ["compress", "--config", "{cfg_version}"], 2, "config version 99"),
    ("config-not-an-object", ["compress", "--config", "{cfg_list}"], 2, "does not hold a JSON object"),
    ("config-binary", ["compress", "--config", "{cfg_binary}"], 2, "is not UTF-8 text"),
    ("config-directory", ["compress", "--config", "{cfg_dir}"], 2, "is a folder"),
    ("config-build-given-to-compress", ["compress", "--config", "{cfg_build_for_compress}"], 2, "has no field(s) backend"),
    # verify / bench on folders that are not builds
    ("verify-empty-folder", ["verify", "{empty_dir}"], 2, "is not a build folder"),
    ("verify-missing-folder", ["verify", "{root}/no-such-build"], 2, "is not a build folder"),
    ("verify-compress-only-folder", ["verify", "{compress_only}"], 2, "holds no finished build"),
    ("bench-a-file", ["bench", "{a_file}"], 2, "is not a build folder"),
]


def _fill(argv: list[str], paths: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(["-q", *argv])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


@pytest.mark.parametrize("name, argv, code, fragment", CLI_ROWS, ids=[r.values[0] if hasattr(r, "marks") else r[0] for r in CLI_ROWS])
def test_cli_bad_input(name, argv, code, fragment, paths, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders (engines/...) and caches stay in this test's folder
    rc, msg = _run(_fill(argv, paths), capsys)
    assert rc == code, msg
    assert fragment.lower() in msg.lower(), msg
    assert "Traceback" not in msg
    if rc == 2:
        assert not (tmp_path / "engines").exists(), "a usage error wrote output"
        assert not (paths["root"] / "never").exists(), "a usage error wrote output"


def test_an_out_folder_of_someone_elses_files_is_left_as_it_was(paths, capsys):
    for argv in ([*C, "--out", str(paths["foreign_dir"])], [*B, "--out", str(paths["foreign_dir"])]):
        assert _run(argv, capsys)[0] == 2
        assert [q.name for q in paths["foreign_dir"].iterdir()] == ["notes.txt"]


def test_an_unreadable_manifest_does_not_make_a_folder_slimexports(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    (tmp_path / "mine" / "manifest.json").write_text("{")
    rc, msg = _run([*C, "--out", str(tmp_path / "mine")], capsys)
    assert rc == 2 and "no readable manifest.json" in msg, msg
    assert sorted(q.name for q in (tmp_path / "mine").iterdir()) == ["manifest.json", "notes.txt"]


def test_a_usage_error_is_one_line_naming_field_value_and_fix(capsys):
    rc, msg = _run(["compress", "--model", "tiny", "--budget", "1.5"], capsys)
    lines = [x for x in msg.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1
    assert lines[0] == "error: AllocConfig.budget=1.5 is invalid (flag --budget); expected a number in (0, 1], e.g. 0.73"


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ConfigError, match="budget"):
        main(["--debug", "compress", "--model", "tiny", "--budget", "0"])


# --- paths the OS refuses (tests run as root: permissions are simulated) ------------------------------------


def test_read_only_output_folder(paths, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p).startswith(str(ro)) else real(p, mode, *a, **k))
    rc, msg = _run([*C, "--out", str(ro / "out")], capsys)
    assert rc == 2 and "cannot write" in msg and "permission denied" in msg and "pass a writable --out folder" in msg
    assert "Traceback" not in msg and not (ro / "out").exists()


def test_mkdir_permission_denied(tmp_path, capsys, monkeypatch):
    target = tmp_path / "denied"
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(target)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    rc, msg = _run([*C, "--out", str(target)], capsys)
    assert rc == 2 and "cannot write" in msg and "Permission denied" in msg and "--out" in msg
    assert "Traceback" not in msg


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_statistics(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("safetensors.torch.save_file", _enospc)
    rc, msg = _run([*C, "--out", str(tmp_path / "out")], capsys)
    assert rc == 1, msg
    assert "no space left on the device while writing" in msg and "free disk space or pass --out on another disk" in msg
    assert "Traceback" not in msg
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.name.startswith(".tmp-")]
    assert not leftovers and not (tmp_path / "out" / "calib").exists()


def test_disk_full_while_writing_json_leaves_no_temporary_file(tmp_path, monkeypatch):
    from slimexport.artifacts import write_json

    monkeypatch.setattr(pathlib.Path, "write_text", _enospc)
    with pytest.raises(ResourceError, match="no space left") as err:
        write_json(tmp_path / "plan.json", {"a": 1})
    assert err.value.exit_code == 1 and "free disk space" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_for_the_shared_calibration_cache_is_only_a_warning(tmp_path, monkeypatch, caplog):
    """The shared cache is an optimisation: failing to fill it must not fail the run."""
    from slimexport.api import compress
    from slimexport.config import AllocConfig, CalibConfig, CompressConfig

    monkeypatch.setattr("slimexport.cache.link_or_copy", _enospc)
    cfg = CompressConfig(model="tiny", calib=CalibConfig(num_prompts=2, num_steps=2, num_bins=1, batch_size=2),
                         alloc=AllocConfig(budget=0.8))
    with caplog.at_level(logging.WARNING, logger="slimexport"):
        res = compress(cfg, out=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert (res.slim_dir / "slim_plan.json").exists()
    assert "could not share calibration statistics" in caplog.text and "no space left" in caplog.text


def test_weights_are_never_unpickled(paths, tmp_path, monkeypatch):
    """A folder with a malicious pickle beside its safetensors: loading reads the safetensors, never the pickle."""
    import pickle

    from slimexport.models.load import build_unet
    from slimexport.models.registry import TINY_UNET

    folder = tmp_path / "unet"
    build_unet(TINY_UNET).save_pretrained(folder, safe_serialization=True)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    bundle = load_model(str(folder))
    assert bundle.unet is not None and not marker.exists()
    with pytest.raises(UsageError, match="pickled .bin files are never loaded"):
        load_model(str(paths["unet_bin"]))
    assert not marker.exists()


# --- the Python API: configs, loaders, engines --------------------------------------------------------------


def _api_rows():
    from slimexport.config import (
        AllocConfig,
        BuildConfig,
        CalibConfig,
        CompressConfig,
        DecomposeConfig,
        ExportConfig,
        VerifyConfig,
    )
    from slimexport.engines.base import EngineConfig, EngineProfile

    return [
        ("alloc-budget-text", lambda p: AllocConfig(budget="0.5"), ConfigError, "AllocConfig.budget='0.5'"),
        ("alloc-budget-bool", lambda p: AllocConfig(budget=True), ConfigError, "AllocConfig.budget=True"),
        ("alloc-propagation-text", lambda p: AllocConfig(propagation="no"), ConfigError, "propagation='no'"),
        ("calib-steps-float", lambda p: CalibConfig(num_steps=4.0), ConfigError, "CalibConfig.num_steps=4.0"),
        ("calib-offload-int", lambda p: CalibConfig(offload=1), ConfigError, "CalibConfig.offload=1"),
        ("decompose-ridge-inf", lambda p: DecomposeConfig(ridge=math.inf), ConfigError, "DecomposeConfig.ridge=inf"),
        ("compress-model-empty", lambda p: CompressConfig(model=""), ConfigError, "CompressConfig.model=''"),
        ("compress-nested-dict", lambda p: CompressConfig(alloc={"budget": 0.5}), ConfigError, "CompressConfig.alloc="),
        ("build-nested-wrong-class", lambda p: BuildConfig(compress=CalibConfig()), ConfigError, "BuildConfig.compress="),
        ("build-batch-order", lambda p: BuildConfig(batch=(4, 2, 1)), ConfigError, "BuildConfig.batch=(4, 2, 1)"),
        ("build-from-dict-budget", lambda p: BuildConfig.from_dict({"compress": {"alloc": {"budget": 0}}}), ConfigError,
         "AllocConfig.budget=0"),
        ("export-opset", lambda p: ExportConfig(opset=22), ConfigError, "ExportConfig.opset=22"),
        ("verify-timestep-1000", lambda p: VerifyConfig(timesteps=(1000.0,)), ConfigError, "timesteps in [0, 1000)"),
        ("profile-zero-batch", lambda p: EngineProfile(min_batch=0), ConfigError, "EngineProfile.min_batch=0"),
        ("engine-device-tpu", lambda p: EngineConfig(device="tpu"), ConfigError, "EngineConfig.device='tpu'"),
        ("engine-cuda-graphs-on-cpu", lambda p: EngineConfig(cuda_graphs=True), ConfigError, "CUDA graphs need a GPU"),
        ("resolve-dtype-fp16-cpu", lambda p: api.resolve_dtype("fp16", torch.device("cpu")),
         SettingError, "CompressConfig.calib_dtype='fp16' on the CPU"),
        ("compress-out-is-a-file", lambda p: api.compress(
            CompressConfig(model="tiny"), out=p["a_file"], progress=False), UsageError, "is a file"),
        ("load-model-hub-offline", lambda p: load_model("owner/no-such-model"),
         ModelNotFoundError, "hf download owner/no-such-model --include"),
        ("load-model-bad-weights", lambda p: load_model(str(p["unet_badweights"])),
         UsageError, "cannot load UNet2DConditionModel"),
        ("load-slim-missing", lambda p: _load_slim(p["root"] / "no-such-slim"), UsageError, "no-such-slim does not exist"),
        ("load-slim-dense-folder", lambda p: _load_slim(p["unet_bin"]), ArtifactError, "slim_plan.json is missing"),
        ("load-slim-other-format", lambda p: _load_slim(_other_format(p["root"])), IncompatibleArtifactError,
         "slim format 'slimexport.slim/0'"),
    ]


def _load_slim(folder):
    from slimexport.slim.apply import load_slim_unet

    return load_slim_unet(folder)


def _other_format(root):
    folder = root / "slim_other_format"
    folder.mkdir(exist_ok=True)
    (folder / "slim_plan.json").write_text(json.dumps({"format": "slimexport.slim/0"}))
    return folder


API_ROWS = _api_rows()


@pytest.mark.parametrize("name, call, exc, fragment", API_ROWS, ids=[r[0] for r in API_ROWS])
def test_api_bad_input(name, call, exc, fragment, paths):
    with pytest.raises(exc) as err:
        call(paths)
    e = err.value
    assert isinstance(e, SlimExportError)
    assert fragment in str(e), str(e)
    assert "\n" not in str(e)
    assert e.exit_code == (2 if isinstance(e, UsageError) else 1)


@pytest.mark.skipif(_has("tensorrt"), reason="TensorRT is installed")
def test_api_build_tensorrt_without_tensorrt_writes_nothing(tmp_path):
    from slimexport.api import build
    from slimexport.config import BuildConfig, CompressConfig

    with pytest.raises(MissingExtraError, match=r"slimexport\[trt\]") as err:
        build(BuildConfig(compress=CompressConfig(model="tiny"), backend="tensorrt"), out=tmp_path / "o", progress=False)
    assert err.value.exit_code == 2 and not (tmp_path / "o").exists()


def test_nan_statistics_on_disk_name_module_and_bin(built, tmp_path):
    """Statistics with a NaN (but a matching digest) are refused on load, naming the module and timestep bin."""
    from slimexport.calibrate.stats import CalibStats

    stats = CalibStats.load(built / "calib")
    key = sorted(k for k in stats.corr if k.endswith(".z"))[0]
    stats.corr[key][1, 2, 3] = math.inf
    stats.save(tmp_path / "calib")
    with pytest.raises(NumericalError) as err:
        CalibStats.load(tmp_path / "calib")
    assert f"{key.rsplit('.', 1)[0]} (GEGLU output) at timestep bin 1" in str(err.value)


# --- engines: shapes outside the build's profile ------------------------------------------------------------


@pytest.fixture(scope="module")
def build_engine_and_profile(built):
    from slimexport.engines.base import EngineConfig, EngineProfile, build_engine

    manifest = json.loads((built / "manifest.json").read_text())
    profile = EngineProfile.from_dict(manifest["profile"])
    engine = build_engine("onnxruntime", built / "onnx" / "slim", EngineConfig(profile=profile, threads=1))
    yield engine, profile
    engine.close()


@pytest.mark.parametrize("name, change, fragment", [
    ("batch-too-large", lambda p: dict(batch=p.max_batch + 2), "batch {max_batch_plus} > max {max_batch}"),
    ("height-too-large", lambda p: dict(height=p.max_height + p.latent_multiple), "height {max_h_plus} > max {max_height}"),
    ("width-too-small", lambda p: dict(width=p.min_width - p.latent_multiple), "width {min_w_minus} < min {min_width}"),
    ("height-off-multiple", lambda p: dict(height=p.opt_height + 1), "is not a multiple of {latent_multiple}"),
    ("fp16-into-fp32", lambda p: dict(dtype="float16"), "input sample has dtype float16, the engine takes float32"),
    ("missing-input", lambda p: dict(drop="timestep"), "engine inputs are"),
])
def test_engine_refuses_inputs_outside_the_build(name, change, fragment, build_engine_and_profile):
    from slimexport.engines.base import make_feeds

    engine, p = build_engine_and_profile
    c = change(p)
    feeds = make_feeds(engine.io_spec, c.get("batch", p.opt_batch), c.get("height", p.opt_height), c.get("width", p.opt_width))
    if "dtype" in c:
        feeds["sample"] = feeds["sample"].astype(np.float16)
    if "drop" in c:
        feeds.pop(c["drop"])
    with pytest.raises(UsageError) as err:
        engine.run(feeds)
    want = fragment.format(max_batch_plus=p.max_batch + 2, max_batch=p.max_batch, max_h_plus=p.max_height + p.latent_multiple,
                           max_height=p.max_height, min_w_minus=p.min_width - p.latent_multiple, min_width=p.min_width,
                           latent_multiple=p.latent_multiple)
    assert want in str(err.value) and "\n" not in str(err.value) and err.value.exit_code == 2


def test_bench_iterations_zero_on_a_build(built, capsys):
    rc, msg = _run(["bench", str(built), "--iterations", "0"], capsys)
    assert rc == 2 and "BenchConfig.iterations=0" in msg and "Traceback" not in msg


def test_too_many_calibration_steps_are_refused_before_any_work(tmp_path):
    """DDIM with steps_offset=1 at 1000 steps reaches t=1000: refused up front, not mid-calibration."""
    from slimexport.config import CalibConfig, CompressConfig

    cfg = CompressConfig(model="tiny", calib=CalibConfig(num_prompts=2, num_steps=1000, num_bins=2, batch_size=2))
    with pytest.raises(UsageError, match="--calib-steps 1000 gives sampler timestep 1000"):
        api.compress(cfg, out=tmp_path / "o", progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "o" / "calib").exists()
