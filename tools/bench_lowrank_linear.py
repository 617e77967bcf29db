"""Benchmark lowrank_linear (``(x U) V + b``, rank-r intermediate on chip) at SD1.4 shapes: torch vs Triton.

Shapes (64x64 latents, M = UNet batch x tokens, UNet batch = 2 x images): proj_in/proj_out at widths
320/640/1280 (K = N = width) with ranks up to 256, and the FFN output projection at width 320 (K = 1280,
N = 320). ``python tools/bench_lowrank_linear.py [--batches 2 8] [--dtype fp16|bf16] [--json PATH]``.
"""

from __future__ import annotations

import sys

import bench_kernels  # noqa: F401  (puts the checkout on sys.path)
import torch

from slimexport.kernels.lowrank_linear import lowrank_linear_ref, lowrank_linear_triton

# (label, tokens per image, K, N, rank)
SHAPES = [
    ("proj w320", 4096, 320, 320, 64),
    ("proj w320", 4096, 320, 320, 160),
    ("proj w640", 1024, 640, 640, 128),
    ("proj w640", 1024, 640, 640, 256),
    ("proj w1280", 256, 1280, 1280, 256),
    ("ff.out w320", 4096, 1280, 320, 160),
]


def cases(batches: list[int], smoke: bool = False) -> list[dict]:
    if smoke:
        return [{"name": "smoke M100 K40 r24 N33", "m": 100, "k": 40, "n": 33, "r": 24}]
    out = []
    for images in batches:
        unet_batch = 2 * images
        for label, tokens, k, n, r in SHAPES:
            m = unet_batch * tokens
            out.append({"name": f"{label} B{unet_batch} M{m} K{k} r{r} N{n}", "m": m, "k": k, "n": n, "r": r})
    return out


def setup(case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    m, k, n, r = case["m"], case["k"], case["n"], case["r"]
    x = torch.randn(m, k, device=device, dtype=dtype)
    u = (torch.randn(k, r, device=device) / k ** 0.5).to(dtype)
    v = (torch.randn(r, n, device=device) / r ** 0.5).to(dtype)
    b = torch.randn(n, device=device, dtype=dtype)

    def check() -> float:
        return bench_kernels.rel_err(lowrank_linear_triton(x, u, v, b),
                                     lowrank_linear_ref(x.float(), u.float(), v.float(), b.float()))

    return {"ref": lambda: lowrank_linear_ref(x, u, v, b), "triton": lambda: lowrank_linear_triton(x, u, v, b),
            "check": check, "flops": 2.0 * m * r * (k + n)}


if __name__ == "__main__":
    sys.exit(bench_kernels.main(ops_default=("lowrank_linear",)))
