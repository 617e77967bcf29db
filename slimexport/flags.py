"""One table of settings by their flag names: the CLI's options and the Python API's keywords are the same names.

``slimexport build --calib-prompts 64 --allocation greedy`` and ``slimexport.build(calib_prompts=64,
allocation="greedy")`` go through :func:`apply_flags` alike: each keyword is a flag without its dashes (``-`` →
``_``) and sets one or more fields of a :class:`~slimexport.config.BuildConfig` (or, for ``compress``, of its
``CompressConfig``), converted as the flag's text would be (``targets="attn,ffn"``, ``temperature="inf"``,
``cache="auto"``, ``height=512`` for ``(512, 512, 512)``). ``CONFIG_FLAGS`` (which flag sets a field, for the
errors) is derived from the same table.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slimexport.config import (
    AllocConfig,
    BenchConfig,
    BuildConfig,
    CacheConfig,
    CalibConfig,
    CompressConfig,
    DecomposeConfig,
    ExportConfig,
    VerifyConfig,
    parse_cache_mode,
)
from slimexport.errors import UsageError


def _targets(v):
    return tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)


def _temperature(v):
    if isinstance(v, str):
        return math.inf if v.strip().lower() in ("inf", "infinity") else float(v)
    return v


def _triple(v):
    if isinstance(v, str):
        v = tuple(int(x) for x in v.split(","))
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v, v)
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class Flag:
    """One setting: the fields it sets (dotted paths in ``BuildConfig``) and how its value is converted."""

    paths: tuple[str, ...]
    convert: Callable[[Any], Any] | None = None
    build_only: bool = False


def _f(*paths: str, convert=None) -> Flag:
    return Flag(paths, convert, build_only=not paths[0].startswith("compress."))


# keyword (= --flag) -> what it sets. Compress flags first (``compress`` takes those), then build's.
FLAGS: dict[str, Flag] = {
    "model": _f("compress.model"),
    "config_of": _f("compress.config_of"),
    "random_weights": _f("compress.random_weights"),
    "device": _f("compress.device"),
    "budget": _f("compress.alloc.budget"),
    "budget_scope": _f("compress.alloc.scope"),
    "budget_metric": _f("compress.alloc.metric"),
    "targets": _f("compress.alloc.targets", convert=_targets),
    "temperature": _f("compress.alloc.temperature", convert=_temperature),
    "allocation": _f("compress.alloc.method"),
    "r_min": _f("compress.alloc.r_min"),
    "attn_quantum": _f("compress.alloc.attn_quantum"),
    "ffn_quantum": _f("compress.alloc.ffn_quantum"),
    "propagation": _f("compress.alloc.propagation"),
    "timestep_weighting": _f("compress.decompose.timestep_weighting"),
    "ffn_selection": _f("compress.decompose.ffn_selection"),
    "qkvo_method": _f("compress.decompose.qkvo_method"),
    "ridge": _f("compress.decompose.ridge"),
    "calib_prompts": _f("compress.calib.num_prompts"),
    "calib_steps": _f("compress.calib.num_steps"),
    "calib_bins": _f("compress.calib.num_bins"),
    "calib_batch": _f("compress.calib.batch_size"),
    "guidance": _f("compress.calib.guidance_scale"),
    "calib_size": _f("compress.calib.height", "compress.calib.width"),
    "calib_dtype": _f("compress.calib_dtype"),
    "calib_offload": _f("compress.calib.offload"),
    "prompts": _f("compress.calib.prompts_file"),
    "seed": _f("compress.calib.seed"),
    "backend": _f("backend"),
    "dtype": _f("export.dtype"),
    "opset": _f("export.opset"),
    "output_name": _f("export.output_name"),
    "batch": _f("batch", convert=_triple),
    "height": _f("height", convert=_triple),
    "width": _f("width", convert=_triple),
    "engine_device": _f("engine_device"),
    "optimization_level": _f("optimization_level"),
    "pipeline": _f("pipeline"),
    "figures": _f("figures"),
    "cache": _f("cache.mode", convert=parse_cache_mode),
    "cache_depth": _f("cache.depth"),
    "cache_threshold": _f("cache.threshold"),
    "iterations": _f("bench.iterations"),
    "bench_target_ci": _f("bench.target_ci"),
    "bench_max_seconds": _f("bench.max_seconds"),
    "warmup": _f("bench.warmup"),
    "max_eps_error": _f("verify.max_eps_error"),
    "min_latent_cosine": _f("verify.min_latent_cosine"),
    "atol": _f("verify.atol"),
    "rtol": _f("verify.rtol"),
}

# Named bundles of settings (``--preset NAME``, ``preset=NAME``), applied before the other flags (which override them).
PRESETS: dict[str, dict[str, Any]] = {
    # The SlimDiff paper's method exactly: attention + FFN under a parameter budget, spectral-influence softmax allocation.
    "paper": {"targets": "attn,ffn", "allocation": "softmax", "temperature": 1.0, "budget_metric": "params",
              "budget_scope": "targeted", "timestep_weighting": "spectral", "ffn_selection": "cpqr", "qkvo_method": "whiten",
              "propagation": False, "calib_prompts": 500, "calib_steps": 25, "calib_bins": 5, "guidance": 7.5},
}

_CLASSES = {"": BuildConfig, "compress": CompressConfig, "compress.alloc": AllocConfig, "compress.calib": CalibConfig,
            "compress.decompose": DecomposeConfig, "export": ExportConfig, "verify": VerifyConfig, "bench": BenchConfig,
            "cache": CacheConfig}


def flag_name(keyword: str) -> str:
    return "--" + keyword.replace("_", "-")


def _field_class(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return _CLASSES[parent].__name__, name


# (config class name, field) -> the flag that sets it: a ConfigError names the flag.
CONFIG_FLAGS: dict[tuple[str, str], str] = {_field_class(p): flag_name(k) for k, f in FLAGS.items() for p in f.paths}


def _set_path(data: dict, path: str, value) -> None:
    *parents, name = path.split(".")
    for p in parents:
        data = data[p]
    data[name] = value


def _unknown(keyword: str, allowed: list[str], build_only: bool) -> UsageError:
    if build_only:
        return UsageError(f"{keyword}= ({flag_name(keyword)}) is a build setting, not a compress one",
                          "pass it to slimexport.build (or drop it)")
    near = difflib.get_close_matches(keyword, allowed, n=1)
    return UsageError(f"unknown setting {keyword}=", f"did you mean {near[0]}=?" if near else
                      f"the settings are the CLI's flags without dashes: {', '.join(allowed)}")


def apply_flags(cfg: BuildConfig | CompressConfig, flags: dict[str, Any]) -> BuildConfig | CompressConfig:
    """``cfg`` with each flag-named setting of ``flags`` applied (``None``: not given, left as in ``cfg``).

    ``preset`` (a name in :data:`PRESETS`) applies its settings first; the other keywords override them.
    ``calib_steps`` below the number of bins, with ``calib_bins`` not given, lowers the bins to one per step.

    Raises:
        UsageError: an unknown keyword (or a build keyword given to ``compress``), naming the nearest one.
        ConfigError: a value the config refuses (its message names the flag through ``CONFIG_FLAGS``).
    """
    compress_only = isinstance(cfg, CompressConfig)
    allowed = [k for k, f in FLAGS.items() if not (compress_only and f.build_only)]
    given = {k: v for k, v in flags.items() if v is not None}
    preset = given.pop("preset", None)
    for k in given:
        if k not in allowed:
            raise _unknown(k, allowed, compress_only and k in FLAGS)
    comp = cfg if compress_only else cfg.compress
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)}")
        given = {**PRESETS[preset], **given}
    steps = given.get("calib_steps")
    if flags.get("calib_bins") is None and isinstance(steps, int) and steps >= 1:  # fewer steps than bins: one per step
        given["calib_bins"] = min(given.get("calib_bins", comp.calib.num_bins), steps)
    if not given:
        return cfg
    data = (BuildConfig(compress=cfg) if compress_only else cfg).to_dict()
    for k, v in given.items():  # all at once: checks across fields (backend and dtype, say) see the final values
        f = FLAGS[k]
        value = f.convert(v) if f.convert is not None else v
        for path in f.paths:
            _set_path(data, path, value)
    root = BuildConfig.from_dict(data)
    return root.compress if compress_only else root


def build_config(**flags) -> BuildConfig:
    """A ``BuildConfig`` from flag-named settings, e.g. ``build_config(model="sd14", budget=0.73, calib_prompts=64)``."""
    return apply_flags(BuildConfig(), flags)
