"""Latency timing and the dense-vs-slim speed comparison.

Timers (:class:`slimexport.timer.CallTimer`): on a CUDA device, CUDA events recorded around each call on the
current stream (GPU time, no host sync inside the loop; for engines that synchronise themselves this approaches
wall time); on the CPU, ``time.perf_counter`` around each call. Percentiles use numpy's linear interpolation. All times are ms.

``compare_speed`` times the dense and the slim engine in the same process, on the same backend, device and
feeds, alternating between them (ABBA order per iteration by default) so that clock, thermal and cache drift
hits both alike. ``speedup = p50_dense / p50_slim``, with a 95% paired-bootstrap interval: iterations (the i-th
dense and i-th slim call: back to back when interleaved, in the same round otherwise) are resampled with
replacement and the ratio of medians recomputed, so the interval carries the run's own noise, shared drift included.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Mapping

import numpy as np

from slimexport.errors import UsageError
from slimexport.timer import CallTimer, is_cuda, synchronize

PERCENTILES = (50, 90, 99)
# Fewer paired iterations than this give no speed-up interval: a bootstrap over a handful of pairs is not one.
MIN_CI_ITERATIONS = 10
MAX_ITERATIONS = 5000  # a budgeted bench's cap per model, whatever its time limit


def _summary(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(t, p)) for p in PERCENTILES}
    out.update(mean=float(t.mean()), min=float(t.min()), iterations=int(t.size))
    return out


def speedup_interval(dense_ms, slim_ms, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(dense) / median(slim)`` over paired iterations.

    ``dense_ms[i]`` and ``slim_ms[i]`` are one iteration's two calls; resampling iterations (not calls) keeps what
    they share. Deterministic for a given ``seed``.
    """
    d, s = np.asarray(dense_ms, dtype=np.float64), np.asarray(slim_ms, dtype=np.float64)
    if d.shape != s.shape or d.ndim != 1 or d.size == 0:
        raise ValueError(f"paired timings must be two equally long non-empty lists, got {d.shape} and {s.shape}")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    ratios = np.median(d[idx], axis=1) / np.median(s[idx], axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def time_callable(fn: Callable[[], object], warmup: int = 5, iterations: int = 20, device: str = "cpu") -> dict:
    """Latency of ``fn()`` in ms.

    Args:
        fn: a zero-argument call (e.g. ``engine.prepare(feeds)``).
        warmup: untimed calls first.
        iterations: timed calls.
        device: ``cpu`` (perf_counter) or ``cuda[:N]`` (CUDA events).

    Returns:
        ``{"p50", "p90", "p99", "mean", "min", "iterations", "warmup", "timer"}`` (ms).
    """
    if not (isinstance(warmup, int) and warmup >= 0):
        raise UsageError(f"warmup={warmup!r} is invalid", "use an integer >= 0")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise UsageError(f"iterations={iterations!r} is invalid", "use an integer >= 1")
    timer = CallTimer(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = [timer.time(fn) for _ in range(iterations)]
    if timer.cuda:
        times = timer.collect()
    return {**_summary(times), "warmup": warmup, "timer": "cuda_events" if timer.cuda else "perf_counter"}


def environment(device: str) -> dict:
    """Device name, CPU threads and library versions for a benchmark record."""
    import torch

    from slimexport.engines.torch_runner import available_cpus, device_name

    env = {"device": device, "device_name": device_name(device), "cpus_available": available_cpus(),
           "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
           "python": platform.python_version(), "versions": {"torch": torch.__version__}}
    if is_cuda(device):
        env["versions"]["cuda"] = torch.version.cuda
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        env["compute_capability"] = f"{major}.{minor}"
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return env


def _abba(n: int) -> list[str]:
    """``n`` iterations of both models in ABBA order (dense, slim, slim, dense, ...)."""
    order: list[str] = []
    for i in range(n):
        order += ["dense", "slim"] if i % 2 == 0 else ["slim", "dense"]
    return order


def compare_speed(dense_engine, slim_engine, feeds: Mapping[str, np.ndarray], *, warmup: int = 5,
                  iterations: int = 20, interleave: bool = True, rounds: int = 5, target_ci: float | None = None,
                  max_seconds: float = 30.0, max_iterations: int = MAX_ITERATIONS) -> dict:
    """Time the dense and the slim engine on the same feeds in this process; ``speedup = p50_dense / p50_slim``.

    Args:
        dense_engine, slim_engine: engines of the same backend on the same device.
        feeds: one input set, staged once per engine (``engine.prepare``).
        warmup: untimed calls of each engine first.
        iterations: timed calls of each engine.
        interleave: alternate every call in ABBA order (dense, slim, slim, dense, ...); ``False``: ``rounds``
            alternating blocks of ``iterations / rounds`` calls each.
        target_ci: time by a budget: after ``iterations`` (interleaved), go on in blocks until the half-width of the
            speed-up's 95% interval is at most ``target_ci`` × the speed-up, ``max_seconds`` of timed calls have
            passed, or ``max_iterations`` are reached (the result's ``stopped_by`` says which). ``None``: exactly
            ``iterations``.

    Returns:
        ``{"dense_ms": {...}, "slim_ms": {...}, "speedup", "speedup_ci95": [low, high], "backend", "device",
        "shapes", "mode", "warmup", "environment": {...}, "dense_engine": info, "slim_engine": info}``.

    Raises:
        UsageError: the engines differ in backend or device.
    """
    if dense_engine.name != slim_engine.name or dense_engine.device != slim_engine.device:
        raise UsageError(f"dense ({dense_engine.name} on {dense_engine.device}) and slim ({slim_engine.name} on "
                         f"{slim_engine.device}) must run on the same backend and device", "build both with the same --backend and --device")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise UsageError(f"iterations={iterations!r} is invalid", "use an integer >= 1")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise UsageError(f"warmup={warmup!r} is invalid", "use an integer >= 0")
    device = dense_engine.device
    calls = {"dense": dense_engine.prepare(feeds), "slim": slim_engine.prepare(feeds)}
    for _ in range(warmup):
        calls["dense"]()
        calls["slim"]()
    timer = CallTimer(device)
    synchronize(device)
    times: dict[str, list[float]] = {"dense": [], "slim": []}

    def run(order: list[str]) -> None:
        raw = [timer.time(calls[k]) for k in order]
        if timer.cuda:
            raw = timer.collect()
        for k, t in zip(order, raw):
            times[k].append(t)

    t0 = time.perf_counter()
    if interleave or target_ci is not None:
        run(_abba(iterations))
    else:
        rounds = max(1, min(rounds, iterations))
        sizes = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
        order: list[str] = []
        for r, n in enumerate(sizes):
            first, second = ("dense", "slim") if r % 2 == 0 else ("slim", "dense")
            order += [first] * n + [second] * n
        run(order)
    stopped_by = "iterations"
    while target_ci is not None:
        n = len(times["dense"])
        lo, hi = speedup_interval(times["dense"], times["slim"]) if n >= MIN_CI_ITERATIONS else (0.0, math.inf)
        ratio = float(np.median(times["dense"]) / np.median(times["slim"]))
        if (hi - lo) / 2 <= target_ci * ratio:
            stopped_by = "interval"
        elif time.perf_counter() - t0 >= max_seconds:
            stopped_by = "time"
        elif n >= max_iterations:
            stopped_by = "max_iterations"
        else:
            run(_abba(min(max(10, n // 2), max_iterations - n)))  # geometric growth: the interval test stays cheap
            continue
        break
    dense, slim = _summary(times["dense"]), _summary(times["slim"])
    return {
        "dense_ms": dense, "slim_ms": slim, "speedup": dense["p50"] / slim["p50"],
        "speedup_ci95": (list(speedup_interval(times["dense"], times["slim"]))  # i-th calls: same iteration or round
                         if len(times["dense"]) >= MIN_CI_ITERATIONS else None),
        "backend": dense_engine.name, "device": device,
        "shapes": {k: list(np.shape(v)) for k, v in feeds.items()},
        "mode": "interleaved ABBA" if interleave or target_ci is not None else f"{rounds} alternating blocks", "warmup": warmup,
        "iterations": len(times["dense"]), "stopped_by": stopped_by, "timed_seconds": round(time.perf_counter() - t0, 3),
        **({"target_ci": target_ci, "max_seconds": max_seconds} if target_ci is not None else {}),
        "timer": "cuda_events" if timer.cuda else "perf_counter",
        "environment": environment(device), "dense_engine": dense_engine.info(), "slim_engine": slim_engine.info(),
    }
