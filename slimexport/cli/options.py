"""Shared click option bundles: each command parses options into config objects and calls one api function."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click

from slimexport.config import (
    ALLOCATIONS,
    FFN_SELECTIONS,
    QKVO_METHODS,
    TARGETS,
    TIMESTEP_WEIGHTINGS,
    CompressConfig,
    parse_cache_mode,
)
from slimexport.flags import CONFIG_FLAGS, PRESETS, apply_flags


def _absolute(path: str | None) -> str | None:
    """An existing local path as an absolute one, so that the config (a build's, a dumped one) works from any folder."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _model_arg(model: str | None, random_weights: bool) -> str | None:
    """``--model`` as recorded: absolute where load_model reads a local path for it, else as given (a registry name,
    also where a folder of that name exists but is not what load_model reads, or a hub id)."""
    if model is None:
        return None
    from slimexport.models.load import local_path

    path = local_path(model, random_weights)
    return str(path.resolve()) if path is not None else model


def _compose(*decorators):
    def wrap(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return wrap


def parse_targets(ctx, param, value: str | None):
    if value is None:
        return None
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    bad = [x for x in items if x not in TARGETS]
    if not items or bad:
        raise click.BadParameter(f"{value!r}: expected a comma-separated subset of {','.join(TARGETS)}")
    if len(set(items)) != len(items):
        raise click.BadParameter(f"{value!r} names a target twice")
    return items


def parse_temperature(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        t = math.inf if value.strip().lower() in ("inf", "infinity") else float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (use e.g. 1.0 or inf)") from None
    return t


model_options = _compose(
    click.option("--model", "-m", default=None, help="Registry name (digits, tiny, sd14, sd15, sd21-base), local diffusers folder, single-file .safetensors checkpoint or hub id. [default: digits]"),
    click.option("--config-of", default=None, help="Registry architecture of a single-file checkpoint (sd15, sd21-base, tiny, ...). [default: detected from its keys]"),
    click.option("--random-weights", is_flag=True, default=None, help="Build the registry architecture with seeded random weights (no download)."),
    click.option("--device", default=None, help="auto, cpu or cuda[:N]. [default: auto]"),
)

compress_options = _compose(
    model_options,
    click.option("--budget", "-b", type=float, default=None, help="Fraction of the targeted parameters kept, in (0, 1]. [default: 0.73]"),
    click.option("--budget-scope", type=click.Choice(["targeted", "unet"]), default=None,
                 help="budget is a fraction of the targeted parameters or of the whole UNet. [default: targeted]"),
    click.option("--budget-metric", type=click.Choice(["params", "macs", "latency"]), default=None,
                 help="What the budget counts: parameters (the paper), MACs at the calibration size, or (build) the "
                      "dense engine's latency, measured per module and rank on --backend. [default: params]"),
    click.option("--targets", callback=parse_targets, default=None, help="Module types compressed, a subset of attn,ffn,resnet,proj (resnet: ResNet inner channels; proj: factored transformer proj_in/proj_out). [default: attn,ffn]"),
    click.option("--temperature", callback=parse_temperature, default=None, help="Allocation softmax temperature (inf = uniform). [default: 1]"),
    click.option("--allocation", type=click.Choice(ALLOCATIONS), default=None, help="greedy (error-aware, beyond the paper), softmax (score-driven, the paper's: --preset paper) or uniform. [default: greedy]"),
    click.option("--r-min", type=int, default=None, help="Smallest per-head rank / FFN width. [default: 8]"),
    click.option("--attn-quantum", type=int, default=None, help="Per-head rank step. [default: 8 at SD size]"),
    click.option("--ffn-quantum", type=int, default=None, help="FFN width step. [default: 64 at SD size]"),
    click.option("--propagation", is_flag=True, default=None, help="Scale module scores by their relative output energy."),
    click.option("--timestep-weighting", type=click.Choice(TIMESTEP_WEIGHTINGS), default=None, help="[default: spectral]"),
    click.option("--ffn-selection", type=click.Choice(FFN_SELECTIONS), default=None, help="[default: cpqr]"),
    click.option("--qkvo-method", type=click.Choice(QKVO_METHODS), default=None, help="[default: whiten]"),
    click.option("--ridge", type=float, default=None, help="Relative ridge on correlations. [default: 1e-4]"),
    click.option("--calib-prompts", type=int, default=None, help="SlimSet size. [default: 500]"),
    click.option("--calib-steps", type=int, default=None, help="DDIM steps of the calibration sampler. [default: 25]"),
    click.option("--calib-bins", type=int, default=None, help="Timestep bins of the statistics. [default: 5]"),
    click.option("--calib-batch", type=int, default=None, help="Prompts per UNet call. [default: 8]"),
    click.option("--guidance", type=float, default=None, help="CFG scale of the calibration sampler. [default: 7.5]"),
    click.option("--calib-size", type=int, default=None, help="Calibration image size in pixels (square). [default: the model's]"),
    click.option("--calib-dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default=None, help="[default: fp16 on GPU, fp32 on CPU]"),
    click.option("--calib-offload", is_flag=True, default=None, help="Keep finished timestep bins in CPU memory."),
    click.option("--prompts", type=click.Path(), default=None, help="Prompt pool file, one prompt per line."),
    click.option("--seed", type=int, default=None, help="Seed of the calibration latents. [default: 0]"),
    click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
                 help="A named set of settings, the other options override it: paper = the SlimDiff paper's method "
                      "(attn,ffn, softmax allocation, parameter budget, 500 prompts x 25 steps)."),
    click.option("--config", "config_file", type=click.Path(), default=None, help="JSON config (from --dump-config); options override it."),
    click.option("--dump-config", is_flag=True, help="Print the resolved config as JSON and exit."),
)


def parse_cache(value: str | None):
    if value is None:
        return None
    from slimexport.errors import UsageError

    try:
        return parse_cache_mode(value)
    except UsageError as err:
        raise click.BadParameter(f"{err.message}; {err.fix}") from None


def parse_triple(ctx, param, value: str | None):
    """``"512"`` → (512, 512, 512); ``"256,512,768"`` → min, opt, max."""
    if value is None:
        return None
    try:
        parts = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected N or MIN,OPT,MAX integers") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise click.BadParameter(f"{value!r}: expected N or MIN,OPT,MAX integers")
    return parts


build_options = _compose(
    compress_options,
    click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "torch", "aoti", "torch-compile", "openvino"]), default=None, help="[default: onnxruntime]"),
    click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
                 help="ONNX/engine precision; bf16: fp32 ONNX computed in bf16 by --backend openvino only. [default: fp32]"),
    click.option("--opset", type=int, default=None, help="ONNX opset (17..21). [default: 19]"),
    click.option("--output-name", type=click.Choice(["latent", "out_sample"]), default=None, help="[default: latent (TensorRT demo)]"),
    click.option("--batch", callback=parse_triple, default=None, help="Prompts per call, N or MIN,OPT,MAX (UNet batch is twice: CFG). [default: 1,1,4]"),
    click.option("--height", callback=parse_triple, default=None, help="Image height in pixels, N or MIN,OPT,MAX. [default: around the model's]"),
    click.option("--width", callback=parse_triple, default=None, help="Image width in pixels, N or MIN,OPT,MAX."),
    click.option("--engine-device", default=None, help="auto, cpu or cuda. [default: auto]"),
    click.option("--optimization-level", type=int, default=None, help="TensorRT builder optimization level. [default: 3]"),
    click.option("--pipeline/--no-pipeline", "pipeline", default=None,
                 help="Write pipeline/: the whole pipeline as ONNX (text encoder, slim UNet, VAE) for diffusers' and "
                      "Optimum's ONNX pipelines. [default: when the model is a pipeline folder or hub model]"),
    click.option("--figures/--no-figures", "figures", default=None,
                 help="Draw figures/ for the report (sample images, ε error per timestep, ranks, latency); --no-figures "
                      "skips their sampled trajectories (minutes at SD sizes on a CPU). [default: --figures]"),
    click.option("--speedup", type=float, default=None,
                 help="Build at the largest budget whose measured speed-up on the engine reaches this (trial builds in "
                      "the same folder, starting at budget 1/S; the targets, metric and allocation say what it cuts)."),
    click.option("--cache", callback=lambda ctx, param, v: parse_cache(v),
                 default=None, help="Step caching: auto (full UNet steps where the measured deep-feature change calls for "
                                    "them), N (the full UNet every N-th step, a shallow path between) or off. [default: off]"),
    click.option("--cache-depth", type=int, default=None,
                 help="Blocks kept at each end of the shallow path (1: shallowest, fastest). [default: 1]"),
    click.option("--cache-threshold", type=float, default=None,
                 help="--cache auto: the largest predicted drift of the cached feature a shallow step may reuse. [default: 0.3]"),
    click.option("--iterations", type=int, default=None,
                 help="Timed iterations per model, exactly. [default: timed by a budget: at least 100 on GPU, 20 on CPU, "
                      "then until --bench-target-ci or --bench-max-seconds]"),
    click.option("--bench-target-ci", type=float, default=None,
                 help="Without --iterations: stop timing when the speed-up's 95%% interval is within this fraction of it. "
                      "[default: 0.02]"),
    click.option("--bench-max-seconds", type=float, default=None,
                 help="Without --iterations: the most seconds of timed calls. [default: 30]"),
    click.option("--warmup", type=int, default=None, help="Untimed iterations per model first. [default: 5]"),
    click.option("--max-eps-error", type=float, default=None, help="Slim-vs-dense gate on mean relative ε error. [default: 0.5]"),
    click.option("--min-latent-cosine", type=float, default=None, help="Slim-vs-dense gate on the trajectory's final latents. [default: 0.8]"),
    click.option("--atol", type=float, default=None, help="Export-parity atol (default per dtype)."),
    click.option("--rtol", type=float, default=None, help="Export-parity rtol (default per dtype)."),
)


def build_config(base, o: dict):
    """Apply ``build`` options (``None`` = not given) on top of a ``BuildConfig``: the API's table, ``slimexport.flags``."""
    return apply_flags(base, _cli_values(o, base.compress))


# The key --dump-config records the output folder under (it is an argument of compress/build, not a config field).
OUT_KEY = "out"


def dumped_config(cfg, out: str | None) -> dict:
    """What ``--dump-config`` prints: the resolved config, and ``--out`` (absolute) when one was given."""
    return {**cfg.to_dict(), **({OUT_KEY: str(Path(out).expanduser().resolve())} if out else {})}


def load_config_file(path: str | None, cls):
    """``(config, out)`` from a ``--dump-config`` file (``out``: its recorded output folder, or ``None``)."""
    if path is None:
        return cls(), None
    from slimexport.errors import UsageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} {'is a folder' if p.is_dir() else 'does not exist'}", "write one with --dump-config")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"config file {p} is not valid JSON ({err.msg} at line {err.lineno})", "write one with --dump-config") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"config file {p} is not UTF-8 text", "write one with --dump-config") from err
    except OSError as err:
        raise UsageError(f"cannot read config file {p} ({err.strerror})", "check its permissions") from err
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} does not hold a JSON object", "write one with --dump-config")
    out = data.pop(OUT_KEY, None)
    if out is not None and not isinstance(out, str):
        raise UsageError(f"config file {p}: '{OUT_KEY}' is {out!r}, not a folder path", "write one with --dump-config")
    return cls.from_dict(data), out


# A setting as the Python API's errors name it: Class.field, or Class.field=value (a quoted repr or a bare word).
_SETTING = re.compile(r"\b([A-Z]\w*)\.(\w+)(?:=('[^']*'|[^\s,;()]+))?")


def as_flags(text: str) -> str:
    """``text`` with each setting of the table written as its flag (``BuildConfig.engine_device='cuda'`` reads
    ``--engine-device cuda``); other text as it is."""

    def flag(m: re.Match) -> str:
        name = CONFIG_FLAGS.get((m[1], m[2]))
        if name is None:
            return m[0]
        return name if m[3] is None else name + " " + m[3].strip("'")

    return _SETTING.sub(flag, text)


def compress_config(base: CompressConfig, o: dict) -> CompressConfig:
    """Apply CLI options (``None`` = not given) on top of ``base``."""
    return apply_flags(base, _cli_values(o, base))


def _cli_values(o: dict, comp: CompressConfig) -> dict:
    """The options as the flags table takes them, local paths made absolute (the config then works from any folder)."""
    random_weights = comp.random_weights if o.get("random_weights") is None else o["random_weights"]
    return {**o, "model": _model_arg(o.get("model"), random_weights), "prompts": _absolute(o.get("prompts"))}


__all__ = ["CONFIG_FLAGS", "build_config", "build_options", "compress_config", "compress_options", "load_config_file",
           "model_options"]
