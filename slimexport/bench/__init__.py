"""Benchmarks: latency percentiles, and dense vs slim in one process on the same backend and shapes."""

from __future__ import annotations

import importlib

_EXPORTS = {"time_callable": "timing", "compare_speed": "timing", "environment": "timing"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"slimexport.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slimexport.bench' has no attribute {name!r}")
