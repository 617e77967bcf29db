"""Verification: parity metrics with stated formulas, and the gates that fail a build on a regression."""

from __future__ import annotations

import importlib

_EXPORTS = {"Tolerance": "metrics", "compare": "metrics", "compare_outputs": "metrics", "DEFAULT_TOLERANCES": "metrics"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"slimexport.verify.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slimexport.verify' has no attribute {name!r}")
