"""Choosing between an op's torch reference and its Triton twin.

Every op in :mod:`slimexport.kernels` has a reference ``<op>_ref`` (plain torch, exported to ONNX, the ground
truth of the tests) and a Triton twin ``<op>_triton`` with the same signature. :func:`dispatch` picks one:

1. Under ``torch.onnx`` export, ``torch.jit`` tracing or ``torch.compile`` the reference, always: the graph
   must hold plain torch ops.
2. Inside :func:`force_kernels` its ``impl`` overrides everything below; else the environment variable
   ``SLIMEXPORT_KERNELS=torch|triton|auto`` overrides the ``impl`` argument.
3. ``TORCH`` is the reference. ``TRITON`` is the twin, and raises :class:`MissingExtraError` when triton is not
   installed.
4. Tensors not on CUDA get the reference, whatever was asked, except that a forced ``TRITON`` runs the twin on
   CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
5. ``AUTO`` on CUDA measures both once per key (op, shapes, strides, dtypes, device, timing mode) with CUDA
   events, a few runs each after warm-up runs (which also compile and autotune the twin), and caches the faster.
   The twin must beat the reference by :data:`AUTO_MIN_SPEEDUP` to be chosen: at a tie the reference's numerics
   win. Arguments named in ``mutates`` are cloned for the measurement, so an in-place op adds exactly once.
   During CUDA graph capture nothing is measured: a cached choice is used, else the reference.
6. Timing mode: eager calls pay Triton's launch overhead from Python (tens of µs), which a CUDA graph removes.
   Code that will replay the op from a CUDA graph (the torch engine with ``cuda_graphs``) measures inside
   :func:`graph_timing`: each candidate is captured :data:`AUTO_GRAPH_REPS` times into a graph and the replay is
   timed. ``$SLIMEXPORT_KERNELS_TIMING=eager|graph`` overrides; a failed graph measurement falls back to eager.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

from slimexport import timer
from slimexport.errors import MissingExtraError, UsageError

ENV_VAR = "SLIMEXPORT_KERNELS"
# "0" makes each Triton kernel launch its first config (after pruning) instead of autotuning over all of them:
# fewer compilations, e.g. for tests on a GPU.
AUTOTUNE_ENV_VAR = "SLIMEXPORT_KERNELS_AUTOTUNE"

# AUTO picks the Triton twin only when it takes at most this fraction of the reference's time (3% margin: the
# spread of back-to-back CUDA-event timings of one small kernel is about that).
AUTO_MIN_SPEEDUP = 0.97
# Measurement of an AUTO choice: untimed warm-up calls of each candidate (the first compiles and autotunes the
# Triton kernel), then timed calls of each, interleaved; the minimum counts.
AUTO_WARMUP_CALLS = 2
AUTO_TIMED_CALLS = 5
# Graph timing: calls captured per graph (the replay's time / reps is one call's GPU time without launch gaps).
AUTO_GRAPH_REPS = 10
TIMING_ENV_VAR = "SLIMEXPORT_KERNELS_TIMING"
TIMING_MODES = ("eager", "graph")


class KernelImpl(str, enum.Enum):
    """Which implementation of a kernel op runs: chosen per call (``AUTO``), the reference, or Triton."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"

    @classmethod
    def parse(cls, value: KernelImpl | str, where: str = "impl") -> KernelImpl:
        """``KernelImpl`` from an enum member or its name in any case; a clear error otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise UsageError(f"{where}={value!r} is not a kernel implementation",
                             "expected one of: auto, torch, triton") from None


_AVAILABLE: bool | None = None
_CHOICES: dict[tuple, KernelImpl] = {}
_LOCK = threading.Lock()
_TIMING = threading.local()
_FORCED = threading.local()


@contextlib.contextmanager
def force_kernels(impl: KernelImpl | str | None = None, *, sdpa_pad: bool | None = None):
    """Force kernel choices in this thread while inside (instead of setting ``$SLIMEXPORT_KERNELS`` and
    ``$SLIMEXPORT_SDPA_PAD``); the previous settings come back on exit, nested uses included.

    Args:
        impl: the implementation every :func:`dispatch` runs (over its ``impl`` argument and
            ``$SLIMEXPORT_KERNELS``); ``None`` leaves the choice as it is. Graph capture still gets the reference.
        sdpa_pad: whether the attention reference pads unequal q/k/v head sizes on CUDA too (it always does on
            the CPU); ``None`` leaves it to ``$SLIMEXPORT_SDPA_PAD``.

    A CUDA graph captured inside (an engine's ``prepare``) keeps the kernels chosen there.
    """
    if impl is not None:
        impl = KernelImpl.parse(impl)
    if sdpa_pad is not None and not isinstance(sdpa_pad, bool):
        raise UsageError(f"sdpa_pad={sdpa_pad!r} is not a bool", "pass True, False or None")
    old = (getattr(_FORCED, "impl", None), getattr(_FORCED, "sdpa_pad", None))
    _FORCED.impl = impl if impl is not None else old[0]
    _FORCED.sdpa_pad = sdpa_pad if sdpa_pad is not None else old[1]
    try:
        yield
    finally:
        _FORCED.impl, _FORCED.sdpa_pad = old


def forced_sdpa_pad() -> bool | None:
    """The ``sdpa_pad`` of the innermost :func:`force_kernels` that set one, else ``None``."""
    return getattr(_FORCED, "sdpa_pad", None)


@contextlib.contextmanager
def graph_timing():
    """AUTO choices made inside are measured as CUDA-graph replays (for code that replays its calls from graphs)."""
    old = getattr(_TIMING, "mode", None)
    _TIMING.mode = "graph"
    try:
        yield
    finally:
        _TIMING.mode = old


def timing_mode() -> str:
    """``eager`` or ``graph``: ``$SLIMEXPORT_KERNELS_TIMING`` when set, else :func:`graph_timing`'s, else eager."""
    env = os.environ.get(TIMING_ENV_VAR, "").strip().lower()
    if env:
        if env not in TIMING_MODES:
            raise UsageError(f"{TIMING_ENV_VAR}={env!r} is not a timing mode", "expected eager or graph")
        return env
    return getattr(_TIMING, "mode", None) or "eager"


def triton_available() -> bool:
    """Whether triton can be imported. Looks for the package without importing it (cached)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            _AVAILABLE = False
    return _AVAILABLE


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _interpreter_took_effect() -> bool:
    """Whether triton was imported with its interpreter on: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates,
    and triton's library helpers (``tl.cdiv``, ``tl.zeros``) are decorated when triton is first imported."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:  # not imported yet: it will pick the interpreter up
        return True
    return type(getattr(standard, "cdiv", None)).__name__ != "JITFunction"


def autotune_enabled() -> bool:
    """Whether the Triton kernels autotune over their configs (``$SLIMEXPORT_KERNELS_AUTOTUNE``, default on)."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def require_triton(op_name: str):
    """Import and return triton, or raise :class:`MissingExtraError` naming the ``kernels`` extra."""
    if not triton_available():
        raise MissingExtraError("triton", "kernels", f"the Triton kernel '{op_name}'")
    try:
        import triton
    except ImportError as err:
        raise MissingExtraError("triton", "kernels", f"the Triton kernel '{op_name}'") from err
    return triton


def in_graph_capture() -> bool:
    """True while torch exports to ONNX, traces with ``torch.jit`` or compiles with ``torch.compile``."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def requested_impl(impl: KernelImpl | str = KernelImpl.AUTO) -> KernelImpl:
    """The implementation asked for: :func:`force_kernels`'s inside one, else ``$SLIMEXPORT_KERNELS`` when set,
    else ``impl``."""
    forced = getattr(_FORCED, "impl", None)
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return KernelImpl.parse(env, where=ENV_VAR)
    return KernelImpl.parse(impl)


def _tensors(args: Sequence) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def shape_key(op_name: str, args: Sequence) -> tuple:
    """Cache key of an AUTO choice: op, and per argument its shape/strides/dtype/device or its value."""
    parts: list = [op_name]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), tuple(a.stride()), str(a.dtype), str(a.device)))
        elif a is None or isinstance(a, (bool, int, str)):
            parts.append(a)
        else:  # floats (a softmax scale) and the like do not change which implementation is faster
            parts.append(type(a).__name__)
    return tuple(parts)


def choose_impl(op_name: str, *args, impl: KernelImpl | str = KernelImpl.AUTO, supported: bool = True) -> KernelImpl:
    """The implementation :func:`dispatch` would run, before any AUTO measurement.

    Returns ``TORCH`` or ``TRITON`` when that is settled, and ``AUTO`` when a measurement (or its cached
    result, see :func:`cached_choice`) decides.
    """
    if in_graph_capture():
        return KernelImpl.TORCH
    want = requested_impl(impl)
    if want is KernelImpl.TORCH:
        return KernelImpl.TORCH
    tensors = _tensors(args)
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if want is KernelImpl.TRITON:
        require_triton(op_name)
        if on_cuda or (interpreter_enabled() and not any(t.is_cuda for t in tensors)):
            return KernelImpl.TRITON
        return KernelImpl.TORCH
    if not on_cuda or not supported or not triton_available():
        return KernelImpl.TORCH
    return KernelImpl.AUTO


def cached_choice(op_name: str, *args) -> KernelImpl | None:
    """The measured AUTO choice for these arguments (in the current :func:`timing_mode`), or ``None``."""
    return _CHOICES.get(shape_key(op_name, args) + (timing_mode(),))


def clear_choices() -> None:
    """Forget all measured AUTO choices."""
    with _LOCK:
        _CHOICES.clear()


def choices() -> dict[tuple, KernelImpl]:
    """A copy of the measured AUTO choices, keyed by :func:`shape_key` plus the timing mode."""
    with _LOCK:
        return dict(_CHOICES)


def _call_args(args: Sequence, mutates: Sequence[int]) -> list:
    call_args = list(args)
    for i in mutates:
        call_args[i] = args[i].clone()
    return call_args


def _device(args: Sequence) -> torch.device:
    tensors = _tensors(args)
    return tensors[0].device if tensors else torch.device("cuda")


def _time_ms(fn: Callable, args: Sequence, mutates: Sequence[int]) -> float:
    """One eager call, CUDA-event timed (launch overhead included)."""
    call_args = _call_args(args, mutates)
    return timer.call_ms(lambda: fn(*call_args), _device(args))


def _time_graph_ms(fn: Callable, args: Sequence, mutates: Sequence[int]) -> float:
    """One call's GPU time from a CUDA graph of :data:`AUTO_GRAPH_REPS` calls (no launch gaps). ``fn`` must have
    run eagerly before (Triton kernels compile and autotune outside the capture)."""
    call_args = _call_args(args, mutates)
    return timer.graph_ms(lambda: fn(*call_args), _device(args), calls=AUTO_GRAPH_REPS, replays=1)


def measure(ref_fn: Callable, triton_fn: Callable, args: Sequence, mutates: Sequence[int] = ()) -> tuple[float, float]:
    """``(reference ms, triton ms)``: the fastest of :data:`AUTO_TIMED_CALLS` timings each, eager or from CUDA
    graphs (:func:`timing_mode`; a graph measurement that fails is redone eagerly, with a warning)."""
    for _ in range(AUTO_WARMUP_CALLS):
        _time_ms(ref_fn, args, mutates)
        _time_ms(triton_fn, args, mutates)
    if timing_mode() == "graph":
        try:
            return (min(_time_graph_ms(ref_fn, args, mutates) for _ in range(2)),
                    min(_time_graph_ms(triton_fn, args, mutates) for _ in range(2)))
        except Exception as err:  # noqa: BLE001 - eager timing still gives a valid (if pessimistic) choice
            warnings.warn(f"slimexport.kernels: timing from a CUDA graph failed ({type(err).__name__}: {err}); "
                          "timing eager calls instead", RuntimeWarning, stacklevel=4)
    ref_ms, tri_ms = float("inf"), float("inf")
    for _ in range(AUTO_TIMED_CALLS):
        ref_ms = min(ref_ms, _time_ms(ref_fn, args, mutates))
        tri_ms = min(tri_ms, _time_ms(triton_fn, args, mutates))
    return ref_ms, tri_ms


def _auto_choice(op_name: str, ref_fn: Callable, triton_fn: Callable, args: Sequence,
                 mutates: Sequence[int]) -> KernelImpl:
    key = shape_key(op_name, args) + (timing_mode(),)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return KernelImpl.TORCH  # cannot synchronise inside a capture; measure on an eager call first
    try:
        ref_ms, tri_ms = measure(ref_fn, triton_fn, args, mutates)
    except Exception as err:  # noqa: BLE001 - an optional fast path that fails falls back to the reference
        warnings.warn(f"slimexport.kernels: the Triton kernel '{op_name}' failed for {key[1:]} and the torch "
                      f"reference is used for this shape instead ({type(err).__name__}: {err}); set "
                      f"{ENV_VAR}=triton to see the error raised", RuntimeWarning, stacklevel=3)
        choice = KernelImpl.TORCH
    else:
        choice = KernelImpl.TRITON if tri_ms <= AUTO_MIN_SPEEDUP * ref_ms else KernelImpl.TORCH
    with _LOCK:
        _CHOICES[key] = choice
    return choice


def dispatch(op_name: str, ref_fn: Callable, triton_fn: Callable, *args, impl: KernelImpl | str = KernelImpl.AUTO,
             mutates: Sequence[int] = (), supported: bool = True):
    """Run ``ref_fn(*args)`` or ``triton_fn(*args)`` as described in the module docstring.

    Args:
        op_name: the op's name, for the cache key and messages.
        ref_fn, triton_fn: the two implementations, same signature.
        *args: positional arguments of both.
        impl: ``AUTO``, ``TORCH`` or ``TRITON`` (or their names); :func:`force_kernels` and
            ``$SLIMEXPORT_KERNELS`` override it.
        mutates: indices of arguments the op writes in place; AUTO measures on clones of them.
        supported: ``False`` when the Triton twin cannot take these arguments; AUTO then uses the reference
            (a forced ``TRITON`` still calls the twin, which raises a clear error).
    """
    choice = choose_impl(op_name, *args, impl=impl, supported=supported)
    if choice is KernelImpl.AUTO:
        choice = _auto_choice(op_name, ref_fn, triton_fn, args, mutates)
    if choice is KernelImpl.TRITON:
        return triton_fn(*args)
    return ref_fn(*args)


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors of a CUDA device (cached); 1 for other devices.

    The Triton wrappers size their grids with it (split-K, split-N) so that small problems still fill the GPU.
    """
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


INT32_MAX = 2**31 - 1  # the Triton kernels index memory with 32-bit offsets


def fits_int32(*tensors: torch.Tensor) -> bool:
    """Whether every element offset of these tensors, strides included, fits in int32."""
    for t in tensors:
        if t.numel() and sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) > INT32_MAX:
            return False
    return True


def check_triton_device(where: str, *tensors: torch.Tensor) -> None:
    """Raise unless the tensors can go to a Triton kernel: all on one CUDA device, or on CPU under the interpreter."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise UsageError(f"{where}: tensors on {sorted(map(str, devices))}", "put them on one device")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreter_enabled():
        if not _interpreter_took_effect():
            raise UsageError(f"{where}: TRITON_INTERPRET=1 was set after triton was imported (diffusers imports it), "
                             "so triton's own helpers are compiled-mode functions the interpreter cannot call",
                             "set TRITON_INTERPRET=1 in the environment before starting Python")
        return
    raise UsageError(f"{where}: Triton kernels run on CUDA tensors, got {device}",
                     "move the tensors to a CUDA device, use impl='torch', or set TRITON_INTERPRET=1 "
                     "before triton is imported to run the kernel in Triton's CPU interpreter")


def on_device(device: torch.device):
    """``torch.cuda.device(device)`` when ``device`` is a CUDA device other than the current one (Triton launches
    on the current device), else a no-op."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# Widest group of channels a Triton kernel loads as one vector: 8 fp16/bf16 values are 16 bytes.
MAX_VECTOR_CHANNELS = 8


def vector_channels(size: int) -> int:
    """Largest power of two dividing ``size``, at most :data:`MAX_VECTOR_CHANNELS` (a mask granularity)."""
    return min(MAX_VECTOR_CHANNELS, size & -size) if size > 0 else 1


class TunedLauncher:
    """Autotune a Triton kernel once per key, then launch it with the chosen config directly.

    ``triton.autotune`` re-derives its cache key from every argument on every call; for the small kernels here
    that bookkeeping costs as much as the kernel. The first call of a key goes through the autotuner (compile,
    benchmark the configs); later calls launch the plain ``@triton.jit`` kernel with the remembered config.

    Args:
        kernel: the ``@triton.jit`` function.
        tuned: ``triton.autotune(...)`` of it (possibly through ``triton.heuristics``).
    """

    def __init__(self, kernel, tuned):
        self.kernel = kernel
        self.tuned = tuned
        self.best: dict[tuple, dict] = {}

    def __call__(self, key: tuple, grid, args: tuple, constexprs: dict, derived=None) -> None:
        """Launch ``kernel[grid(config)](*args, **constexprs, **config)``.

        ``key`` must determine the autotuner's choice (its key arguments and dtypes, at least); ``derived`` is
        an optional ``(config) -> dict`` of constexprs that depend on the config, computed by a
        ``triton.heuristics`` inside ``tuned`` on the first call.
        """
        config = self.best.get(key)
        if config is None:
            self.tuned[grid](*args, **constexprs)
            self.best[key] = self.tuned.best_config.all_kwargs()
            return
        extra = derived(config) if derived is not None else {}
        self.kernel[grid(config)](*args, **constexprs, **extra, **config)
