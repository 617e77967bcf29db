"""Benchmark the slimexport Triton kernels against their torch references at SD1.4 shapes.

Runs tools/bench_cov_accumulate.py, tools/bench_decoupled_attention.py and tools/bench_lowrank_linear.py and
prints one row per shape as it is measured: torch ms, triton ms, speedup (torch / triton), the relative error
of the Triton result against the reference, and the seconds the first Triton call took (compile + autotune).
``speedup`` compares eager calls back to back (Python and launch overhead included, as in an eager UNet);
``graph_speedup`` compares the same calls replayed from CUDA graphs (GPU time alone, as under CUDA graphs or
an engine). The note's TFLOP/s is the Triton kernel's, from the graph time, counting unpadded head sizes/ranks.
A shape that fails prints a row with the error and the run goes on.

    python tools/bench_kernels.py                        # all ops, UNet batch 4 and 16 (batch 2 and 8 with CFG)
    python tools/bench_kernels.py --ops attention --batches 2 --dtype bf16 --json bench.json

Without CUDA it runs a smoke test of the references at tiny shapes (seconds) and says so. No prompts; rows are
flushed as they come; ``--json`` is rewritten after every row, so a run cut short keeps what it measured.
This file also holds the timing helpers the three op scripts share.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # the op scripts beside this file; slimexport from the checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

OPS = ("cov_accumulate", "decoupled_attention", "lowrank_linear")
OP_ALIASES = {"cov": "cov_accumulate", "attention": "decoupled_attention", "attn": "decoupled_attention",
              "lowrank": "lowrank_linear"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_BATCHES = (2, 8)  # images per prompt batch; classifier-free guidance doubles the UNet batch
# Timing: warm-up calls, then loops of back-to-back calls of at least MIN_LOOP_MS each; the median loop counts.
WARMUP_CALLS = 3
MIN_LOOP_MS = 20.0
TIMED_LOOPS = 5
MAX_CALLS_PER_LOOP = 500

COLUMNS = [("op", 20), ("case", 40), ("dtype", 5), ("torch_ms", 9), ("triton_ms", 9), ("speedup", 7),
           ("graph_speedup", 13), ("rel_err", 8), ("first_s", 7), ("note", 0)]


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of one call of ``fn`` in ms: CUDA events around loops of back-to-back calls (CPU: wall clock)."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(WARMUP_CALLS):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    single = max(start.elapsed_time(end), 1e-3)
    calls = int(min(MAX_CALLS_PER_LOOP, max(3, math.ceil(MIN_LOOP_MS / single))))
    loops = []
    for _ in range(TIMED_LOOPS):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        loops.append(start.elapsed_time(end) / calls)
    return statistics.median(loops)


def graph_time_ms(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float | None:
    """Median time of one call in ms when ``calls`` calls replay as one CUDA graph: the GPU time without the
    Python and launch overhead of eager calls. ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(TIMED_LOOPS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, synchronised: for a Triton kernel's first call, compile and autotune time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in fp32."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def fmt(value, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    else:
        text = str(value)
    return text.ljust(width) if width else text


def print_row(row: dict) -> None:
    print("  ".join(fmt(row.get(name), width) for name, width in COLUMNS), flush=True)


def print_header() -> None:
    print("  ".join(name.ljust(width) if width else name for name, width in COLUMNS), flush=True)
    print("-" * 120, flush=True)


def measure_case(op: str, case: dict, setup: Callable, dtype: torch.dtype, device: torch.device,
                 with_triton: bool) -> dict:
    """One row: build the case's tensors with ``setup``, check the Triton result, time both."""
    row = {"op": op, "case": case["name"], "dtype": str(dtype).replace("torch.", "").replace("float", "fp"),
           "torch_ms": None, "triton_ms": None, "speedup": None, "torch_graph_ms": None, "triton_graph_ms": None,
           "graph_speedup": None, "rel_err": None, "first_s": None, "note": ""}
    try:
        bench = setup(case, dtype, device)
        row["torch_ms"] = time_ms(bench["ref"], device)
        if with_triton:
            row["first_s"] = first_call_s(bench["triton"], device)
            row["rel_err"] = bench["check"]()
            row["triton_ms"] = time_ms(bench["triton"], device)
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
            try:  # GPU time alone: both replayed from CUDA graphs
                row["torch_graph_ms"] = graph_time_ms(bench["ref"], device)
                row["triton_graph_ms"] = graph_time_ms(bench["triton"], device)
                if row["torch_graph_ms"] and row["triton_graph_ms"]:
                    row["graph_speedup"] = row["torch_graph_ms"] / row["triton_graph_ms"]
            except RuntimeError as err:  # capture can fail (e.g. a synchronising op); the eager row still counts
                row["graph_error"] = f"{type(err).__name__}: {err}"
            if bench.get("flops"):
                row["triton_tflops"] = bench["flops"] / (row["triton_graph_ms"] or row["triton_ms"]) / 1e9
                row["note"] = f"triton {row['triton_tflops']:.0f} TFLOP/s"
        row["note"] = "; ".join(part for part in (row["note"], bench.get("note", "")) if part)
    except Exception as err:  # noqa: BLE001 - a benchmark row reports its failure and the run goes on
        row["note"] = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        row["traceback"] = traceback.format_exc()
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_json(path: str | None, env: dict, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


def run(ops: list[str], batches: list[int], dtype_name: str, json_path: str | None, smoke: bool) -> list[dict]:
    """Run the op scripts' cases, printing rows as they come. Returns the rows."""
    import importlib

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("no CUDA device: smoke run of the torch references at tiny shapes (Triton columns empty)", flush=True)
        smoke = True
    from slimexport.kernels.dispatch import interpreter_enabled, triton_available

    with_triton = cuda and triton_available() and not interpreter_enabled()
    if cuda and not with_triton:
        print("triton is not usable here (missing, or TRITON_INTERPRET=1): timing the references only", flush=True)
    env = environment()
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    print_header()
    rows: list[dict] = []
    dtype = DTYPES[dtype_name]
    for op in ops:
        module = importlib.import_module(f"bench_{op}")
        for case in module.cases(batches, smoke=smoke):
            row = measure_case(op, case, module.setup, dtype, device, with_triton)
            print_row(row)
            rows.append(row)
            write_json(json_path, env, rows)
    failed = [r for r in rows if r["note"].startswith("FAILED")]
    if failed:
        print(f"{len(failed)} of {len(rows)} rows failed; tracebacks are in the JSON (--json)" if json_path
              else f"{len(failed)} of {len(rows)} rows failed:", flush=True)
        if not json_path:
            for r in failed:
                print(r.get("traceback", ""), flush=True)
    return rows


def parse_args(argv: list[str] | None, ops_default: tuple[str, ...] = OPS) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(ops_default),
                        help=f"ops to run: {', '.join(OPS)} (or cov, attention, lowrank)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES),
                        help="images per batch; the UNet batch is twice that (classifier-free guidance)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="activation dtype")
    parser.add_argument("--json", metavar="PATH", help="write the rows (and environment) as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes only")
    args = parser.parse_args(argv)
    ops = []
    for name in args.ops:
        name = OP_ALIASES.get(name, name)
        if name not in OPS:
            parser.error(f"unknown op {name!r}; expected one of {', '.join(OPS)}")
        ops.append(name)
    args.ops = ops
    return args


def main(argv: list[str] | None = None, ops_default: tuple[str, ...] = OPS) -> int:
    args = parse_args(argv, ops_default)
    rows = run(args.ops, args.batches, args.dtype, args.json, args.smoke)
    return 1 if rows and all(r["note"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
