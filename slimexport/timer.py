"""Timing of calls, in one module: the wall clock on the CPU, CUDA events on a GPU, and CUDA-graph replays.

The benchmarks (:mod:`slimexport.bench.timing`), the kernel dispatch's AUTO measurement
(:mod:`slimexport.kernels.dispatch`) and the kernel benchmarks (:mod:`slimexport.bench.kernel_bench`) time with
these. Times are in milliseconds unless a name says seconds. On CUDA, events are recorded on the device's current
stream: they give the GPU time of the work queued between them, without a host synchronisation per call.

It imports only torch: every layer of the package may use it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def is_cuda(device: str | torch.device) -> bool:
    """Whether ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) is a CUDA device."""
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device) -> None:
    """Wait for the queued work of a CUDA device; a no-op elsewhere."""
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


class CallTimer:
    """Times calls one by one: ``perf_counter`` around each on the CPU, CUDA events around each on a GPU.

    On CUDA, :meth:`time` only records the events and returns ``None``; :meth:`collect` synchronises once and
    returns the elapsed times of the calls recorded since the last collect, in order.
    """

    def __init__(self, device: str | torch.device):
        self.cuda = is_cuda(device)
        self.device = torch.device(device)
        self.pending: list[tuple] = []

    def time(self, fn: Callable[[], object]) -> float | None:
        """Run ``fn()``; its time in ms on the CPU, ``None`` on CUDA (see :meth:`collect`)."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(self.device)
        start.record(stream)
        fn()
        end.record(stream)
        self.pending.append((start, end))
        return None

    def collect(self) -> list[float]:
        """Elapsed ms of the CUDA calls recorded since the last collect (synchronises once); ``[]`` on the CPU."""
        if not self.cuda:
            return []
        torch.cuda.synchronize(self.device)
        out = [s.elapsed_time(e) for s, e in self.pending]
        self.pending = []
        return out


def call_ms(fn: Callable[[], object], device: str | torch.device) -> float:
    """One call of ``fn`` in ms, waited for: CUDA events around it on a GPU (launch overhead included), the wall
    clock on the CPU."""
    timer = CallTimer(device)
    ms = timer.time(fn)
    return ms if ms is not None else timer.collect()[0]


def loop_ms(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, min_loop_ms: float = 20.0,
            loops: int = 5, max_calls: int = 500) -> float:
    """Median time of one call in ms, from loops of back-to-back calls (eager: Python and launch overhead included).

    On CUDA: ``warmup`` calls, then ``loops`` loops of as many calls as fill ``min_loop_ms`` (at least 3, at most
    ``max_calls``), each timed with CUDA events; the median loop's time per call. On the CPU (a smoke run): one
    untimed call, then one timed call.
    """
    if not is_cuda(device):
        fn()
        return call_ms(fn, device)
    for _ in range(warmup):
        fn()
    single = max(call_ms(fn, device), 1e-3)
    calls = int(min(max_calls, max(3, -(-min_loop_ms // single))))

    def loop():
        for _ in range(calls):
            fn()

    return statistics.median(call_ms(loop, device) / calls for _ in range(loops))  # each loop waited for


def graph_ms(fn: Callable[[], object], device: str | torch.device, calls: int = 20, replays: int = 5,
             warmup: int = 0) -> float | None:
    """Time of one call in ms when ``calls`` calls replay as one CUDA graph: the GPU time without the Python and
    launch overhead of eager calls (the median over ``replays`` timed replays, after one that uploads the graph).

    ``warmup`` eager calls run first on a side stream (as ``torch.cuda.graphs`` asks before a capture); with 0,
    ``fn`` must have run eagerly before (Triton kernels compile and autotune outside the capture). ``None`` off
    CUDA. A capture that fails raises (for instance an op that synchronises).
    """
    if not is_cuda(device):
        return None
    device = torch.device(device)
    if warmup:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay uploads the graph
    timer = CallTimer(device)
    for _ in range(replays):
        timer.time(graph.replay)
    times = timer.collect()
    del graph
    return statistics.median(t / calls for t in times)


def wall_seconds(fn: Callable[[], object], device: str | torch.device) -> float:
    """Wall-clock seconds of one call, with the device synchronised before and after (for a Triton kernel's first
    call: its compile and autotune time)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0
