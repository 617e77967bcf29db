"""Benchmark the Triton kernels against their torch references at SD1.4 shapes.

One row per (op, shape) as it is measured: torch ms, triton ms, speedup (torch / triton), the relative error of the
Triton result against the reference, and the seconds the first Triton call took (compile + autotune).
``speedup`` compares eager calls back to back (Python and launch overhead included, as in an eager UNet);
``graph_speedup`` compares the same calls replayed from CUDA graphs (GPU time alone, as under CUDA graphs or an
engine). The note's TFLOP/s is the Triton kernel's, from the graph time, counting unpadded head sizes/ranks. A
shape that fails prints a row with the error and the run goes on. Timing: :mod:`slimexport.timer`.

Shapes (64x64 latents; UNet batch = 2 x images for classifier-free guidance):

- ``cov_accumulate``: C_X (the attention input) at n = 320/640/1280 with tokens = batch·4096/1024/256, and C_Z (the
  GEGLU output) at n = 1280/2560/5120 with the same token counts.
- ``decoupled_attention``: 8 heads; self-attention at N = S = 4096 (width 320, d = 40), 1024 (width 640, d = 80)
  and 256 (width 1280, d = 160), cross-attention at S = 77 text tokens, with slim ranks (r_qk/r_vo) and the dense
  head size. q, k and v are the transposed [B, N, H, r] views the slim attention processor passes.
- ``lowrank_linear``: proj_in/proj_out at widths 320/640/1280 (K = N = width) with ranks up to 256, and the FFN
  output projection at width 320 (K = 1280, N = 320).

Without CUDA it runs a smoke test of the references at tiny shapes (seconds) and says so. Rows are flushed as they
come; ``--json`` is rewritten after every row, so a run cut short keeps what it measured. Command lines:
``python -m slimexport.bench.kernel_bench`` and ``tools/bench_kernels.py`` / ``tools/bench_<op>.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from slimexport import timer
from slimexport.kernels.cov_accumulate import cov_accumulate_ref, cov_accumulate_triton
from slimexport.kernels.decoupled_attention import decoupled_attention_ref, decoupled_attention_triton
from slimexport.kernels.dispatch import interpreter_enabled, triton_available
from slimexport.kernels.lowrank_linear import lowrank_linear_ref, lowrank_linear_triton

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
GRAPH_CALLS = 20  # calls captured per CUDA graph for graph_speedup

COLUMNS = [("op", 20), ("case", 40), ("dtype", 5), ("torch_ms", 9), ("triton_ms", 9), ("speedup", 7),
           ("graph_speedup", 13), ("rel_err", 8), ("first_s", 7), ("note", 0)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in fp32."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ cov_accumulate

TOKENS_PER_IMAGE = {320: 4096, 640: 1024, 1280: 256}  # 64x64 latents: tokens at each UNet width
FFN_MULT = 4  # GEGLU output width = 4 x block width


def cov_accumulate_cases(batches: list[int], smoke: bool = False) -> list[dict]:
    if smoke:
        return [{"name": "smoke n64 T130", "n": 64, "tokens": 130}]
    out = []
    for images in batches:
        unet_batch = 2 * images
        for label, mult in (("C_X", 1), ("C_Z", FFN_MULT)):
            for width, tokens in TOKENS_PER_IMAGE.items():
                n, t = mult * width, unet_batch * tokens
                out.append({"name": f"{label} w{width} B{unet_batch} n{n} T{t}", "n": n, "tokens": t})
    return out


def cov_accumulate_setup(case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    n, tokens = case["n"], case["tokens"]
    x = torch.randn(tokens, n, device=device, dtype=dtype)
    acc_ref = torch.zeros(n, n, device=device)
    acc_tri = torch.zeros(n, n, device=device)

    def check() -> float:
        a, b = torch.zeros(n, n, device=device), torch.zeros(n, n, device=device)
        cov_accumulate_ref(a, x)
        cov_accumulate_triton(b, x)
        return rel_err(b, a)

    return {"ref": lambda: cov_accumulate_ref(acc_ref, x), "triton": lambda: cov_accumulate_triton(acc_tri, x),
            "check": check, "flops": 2.0 * tokens * n * n}


# ------------------------------------------------------------------------------------------- decoupled_attention

HEADS = 8
TEXT_TOKENS = 77
# (kind, width, tokens per image, r_qk, r_vo): slim ranks and, for comparison, the dense head size d = width / 8.
ATTENTION_SHAPES = [
    ("self", 320, 4096, 24, 32),
    ("self", 320, 4096, 40, 40),
    ("self", 640, 1024, 48, 64),
    ("self", 640, 1024, 80, 80),
    ("self", 1280, 256, 96, 128),
    ("self", 1280, 256, 160, 160),
    ("cross", 320, 4096, 24, 32),
    ("cross", 320, 4096, 40, 40),
    ("cross", 640, 1024, 48, 64),
]


def decoupled_attention_cases(batches: list[int], smoke: bool = False) -> list[dict]:
    if smoke:
        return [{"name": "smoke self N70 r24/40", "batch": 1, "heads": 2, "n": 70, "s": 70, "r_qk": 24,
                 "r_vo": 40, "d": 40}]
    out = []
    for images in batches:
        unet_batch = 2 * images
        for kind, width, tokens, r_qk, r_vo in ATTENTION_SHAPES:
            s = tokens if kind == "self" else TEXT_TOKENS
            out.append({"name": f"{kind} w{width} B{unet_batch} N{tokens} S{s} r{r_qk}/{r_vo}",
                        "batch": unet_batch, "heads": HEADS, "n": tokens, "s": s, "r_qk": r_qk, "r_vo": r_vo,
                        "d": width // HEADS})
    return out


def sdpa_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> str:
    """Which SDPA backends take these inputs (r_vo != r_qk rules some out): the reference's candidates."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return ""
    names = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
             "MATH": "math"}
    ok = []
    for attr, label in names.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # each refusing backend warns why
                decoupled_attention_ref(q, k, v, scale)
            ok.append(label)
        except RuntimeError:
            pass
    return "sdpa can use " + "/".join(ok)


def decoupled_attention_setup(case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, H, N, S = case["batch"], case["heads"], case["n"], case["s"]
    r_qk, r_vo = case["r_qk"], case["r_vo"]
    scale = case["d"] ** -0.5
    # The processor's layout: [B, N, H, r] memory viewed as [B, H, N, r].
    q = torch.randn(B, N, H, r_qk, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, S, H, r_qk, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, S, H, r_vo, device=device, dtype=dtype).transpose(1, 2)

    def check() -> float:
        return rel_err(decoupled_attention_triton(q, k, v, scale),
                       decoupled_attention_ref(q.float(), k.float(), v.float(), scale))

    note = sdpa_backends(q, k, v, scale) if device.type == "cuda" else ""
    return {"ref": lambda: decoupled_attention_ref(q, k, v, scale),
            "triton": lambda: decoupled_attention_triton(q, k, v, scale),
            "check": check, "flops": 2.0 * B * H * N * S * (r_qk + r_vo), "note": note}


# ------------------------------------------------------------------------------------------------ lowrank_linear

# (label, tokens per image, K, N, rank)
LOWRANK_SHAPES = [
    ("proj w320", 4096, 320, 320, 64),
    ("proj w320", 4096, 320, 320, 160),
    ("proj w640", 1024, 640, 640, 128),
    ("proj w640", 1024, 640, 640, 256),
    ("proj w1280", 256, 1280, 1280, 256),
    ("ff.out w320", 4096, 1280, 320, 160),
]


def lowrank_linear_cases(batches: list[int], smoke: bool = False) -> list[dict]:
    if smoke:
        return [{"name": "smoke M100 K40 r24 N33", "m": 100, "k": 40, "n": 33, "r": 24}]
    out = []
    for images in batches:
        unet_batch = 2 * images
        for label, tokens, k, n, r in LOWRANK_SHAPES:
            m = unet_batch * tokens
            out.append({"name": f"{label} B{unet_batch} M{m} K{k} r{r} N{n}", "m": m, "k": k, "n": n, "r": r})
    return out


def lowrank_linear_setup(case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    m, k, n, r = case["m"], case["k"], case["n"], case["r"]
    x = torch.randn(m, k, device=device, dtype=dtype)
    u = (torch.randn(k, r, device=device) / k ** 0.5).to(dtype)
    v = (torch.randn(r, n, device=device) / r ** 0.5).to(dtype)
    b = torch.randn(n, device=device, dtype=dtype)

    def check() -> float:
        return rel_err(lowrank_linear_triton(x, u, v, b),
                       lowrank_linear_ref(x.float(), u.float(), v.float(), b.float()))

    return {"ref": lambda: lowrank_linear_ref(x, u, v, b), "triton": lambda: lowrank_linear_triton(x, u, v, b),
            "check": check, "flops": 2.0 * m * r * (k + n)}


# op -> (cases(batches, smoke) -> [case], setup(case, dtype, device) -> {"ref", "triton", "check", "flops", "note"})
BENCHMARKS: dict[str, tuple[Callable, Callable]] = {
    "cov_accumulate": (cov_accumulate_cases, cov_accumulate_setup),
    "decoupled_attention": (decoupled_attention_cases, decoupled_attention_setup),
    "lowrank_linear": (lowrank_linear_cases, lowrank_linear_setup),
}

# -------------------------------------------------------------------------------------------------------- runner


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


def _loop_ms(fn: Callable[[], object], device: torch.device) -> float:
    return timer.loop_ms(fn, device, warmup=WARMUP_CALLS, min_loop_ms=MIN_LOOP_MS, loops=TIMED_LOOPS,
                         max_calls=MAX_CALLS_PER_LOOP)


def _graph_ms(fn: Callable[[], object], device: torch.device) -> float | None:
    return timer.graph_ms(fn, device, calls=GRAPH_CALLS, replays=TIMED_LOOPS, warmup=WARMUP_CALLS)


def measure_case(op: str, case: dict, setup: Callable, dtype: torch.dtype, device: torch.device,
                 with_triton: bool) -> dict:
    """One row: build the case's tensors with ``setup``, check the Triton result, time both."""
    row = {"op": op, "case": case["name"], "dtype": str(dtype).replace("torch.", "").replace("float", "fp"),
           "torch_ms": None, "triton_ms": None, "speedup": None, "torch_graph_ms": None, "triton_graph_ms": None,
           "graph_speedup": None, "rel_err": None, "first_s": None, "note": ""}
    try:
        bench = setup(case, dtype, device)
        row["torch_ms"] = _loop_ms(bench["ref"], device)
        if with_triton:
            row["first_s"] = timer.wall_seconds(bench["triton"], device)
            row["rel_err"] = bench["check"]()
            row["triton_ms"] = _loop_ms(bench["triton"], device)
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
            try:  # GPU time alone: both replayed from CUDA graphs
                row["torch_graph_ms"] = _graph_ms(bench["ref"], device)
                row["triton_graph_ms"] = _graph_ms(bench["triton"], device)
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


def write_json(path: str | Path | None, env: dict, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


def run(ops: list[str], batches: list[int], dtype_name: str, json_path: str | Path | None, smoke: bool) -> list[dict]:
    """Run the ops' cases, printing rows as they come. Returns the rows."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("no CUDA device: smoke run of the torch references at tiny shapes (Triton columns empty)", flush=True)
        smoke = True
    with_triton = cuda and triton_available() and not interpreter_enabled()
    if cuda and not with_triton:
        print("triton is not usable here (missing, or TRITON_INTERPRET=1): timing the references only", flush=True)
    env = environment()
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    print_header()
    rows: list[dict] = []
    dtype = DTYPES[dtype_name]
    for op in ops:
        cases, setup = BENCHMARKS[op]
        for case in cases(batches, smoke=smoke):
            row = measure_case(op, case, setup, dtype, device, with_triton)
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
    """Command line: 0 unless every row failed."""
    args = parse_args(argv, ops_default)
    rows = run(args.ops, args.batches, args.dtype, args.json, args.smoke)
    return 1 if rows and all(r["note"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
