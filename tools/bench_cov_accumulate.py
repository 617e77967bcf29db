"""Benchmark cov_accumulate (``acc += xᵀx`` in fp32) at SD1.4 calibration shapes: torch reference vs Triton.

Shapes (64x64 latents, UNet batch = 2 x images for classifier-free guidance): C_X (the attention input) at
n = 320/640/1280 with tokens = batch·4096/1024/256, and C_Z (the GEGLU output) at n = 1280/2560/5120 with the
same token counts. ``python tools/bench_cov_accumulate.py [--batches 2 8] [--dtype fp16] [--json PATH]``.
"""

from __future__ import annotations

import sys

import bench_kernels  # noqa: F401  (puts the checkout on sys.path)
import torch

from slimexport.kernels.cov_accumulate import cov_accumulate_ref, cov_accumulate_triton

TOKENS_PER_IMAGE = {320: 4096, 640: 1024, 1280: 256}  # 64x64 latents: tokens at each UNet width
FFN_MULT = 4  # GEGLU output width = 4 x block width


def cases(batches: list[int], smoke: bool = False) -> list[dict]:
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


def setup(case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    n, tokens = case["n"], case["tokens"]
    x = torch.randn(tokens, n, device=device, dtype=dtype)
    acc_ref = torch.zeros(n, n, device=device)
    acc_tri = torch.zeros(n, n, device=device)

    def check() -> float:
        a, b = torch.zeros(n, n, device=device), torch.zeros(n, n, device=device)
        cov_accumulate_ref(a, x)
        cov_accumulate_triton(b, x)
        return bench_kernels.rel_err(b, a)

    return {"ref": lambda: cov_accumulate_ref(acc_ref, x), "triton": lambda: cov_accumulate_triton(acc_tri, x),
            "check": check, "flops": 2.0 * tokens * n * n}


if __name__ == "__main__":
    sys.exit(bench_kernels.main(ops_default=("cov_accumulate",)))
