"""Errors that say what went wrong, where, and how to fix it.

Every error a user can cause is a :class:`SlimExportError`. The CLI prints ``error: <message>`` on one line
(no traceback unless ``--debug``) and exits with the error's ``exit_code``: 2 for usage errors, 1 for a
failed verification or a run-time failure.
"""

from __future__ import annotations


class SlimExportError(Exception):
    """Base class. ``str(err)`` is one line: what, where, and the fix."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message}; {fix}" if fix else message)


class UsageError(SlimExportError, ValueError):
    """A bad option, config field, path or input file (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config field outside its allowed range."""

    def __init__(self, cls: str, field: str, value, allowed: str):
        super().__init__(f"{cls}.{field}={value!r} is invalid", f"expected {allowed}")
        self.cls, self.field = cls, field


class SettingError(UsageError):
    """A setting this machine or the other settings rule out. Message and fix name settings as ``Class.field`` or
    ``Class.field=value`` (the Python API's words); the CLI prints the flag that sets each instead."""


class ModelNotFoundError(UsageError):
    """The model is neither a registry name, a local folder, a cached hub id nor reachable on the hub."""


# Extras whose install needs more than pip and PyPI: what the fix must say besides the pip command.
EXTRA_NOTES = {
    "trt": "TensorRT needs an NVIDIA GPU with its CUDA libraries (see NVIDIA's TensorRT install guide); without it "
           "use --backend onnxruntime or aoti",
}


class MissingExtraError(UsageError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        note = EXTRA_NOTES.get(extra)
        super().__init__(
            f"{purpose} needs the optional package '{package}', which is not installed",
            f"install it with: pip install 'slimexport[{extra}]' (from a source checkout: pip install -e '.[{extra}]')"
            + (f"; {note}" if note else ""),
        )


class ArtifactError(SlimExportError):
    """An artifact on disk is missing, truncated, altered or was made by something else."""


class IncompatibleArtifactError(ArtifactError, UsageError):
    """An artifact made for another model, version, device or budget (exit code 2)."""

    exit_code = 2


class NumericalError(SlimExportError):
    """NaN/Inf or an unusable matrix in statistics or factorisations."""


class VerificationError(SlimExportError):
    """A parity gate failed (exit code 1)."""

    exit_code = 1


class TargetNotReachedError(SlimExportError):
    """A speed target (``--speedup``) no budget reached (exit code 1); the folder holds the fastest build."""

    exit_code = 1


class ResourceError(SlimExportError):
    """Out of memory or disk, with the options that help."""


def require(package: str, extra: str, purpose: str):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise MissingExtraError(package, extra, purpose) from err
