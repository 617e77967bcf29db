"""Benchmark decoupled_attention (r_vo ≠ r_qk, explicit scale) at SD1.4 shapes: torch SDPA vs Triton.

Shapes (64x64 latents, 8 heads, UNet batch = 2 x images): self-attention at N = S = 4096 (width 320, d = 40),
1024 (width 640, d = 80) and 256 (width 1280, d = 160), cross-attention at S = 77 text tokens, with slim ranks
(r_qk/r_vo) and the dense head size. q, k and v are the transposed [B, N, H, r] views the slim attention
processor passes. ``python tools/bench_decoupled_attention.py [--batches 2 8] [--dtype fp16|bf16] [--json P]``.
"""

from __future__ import annotations

import sys
import warnings

import bench_kernels  # noqa: F401  (puts the checkout on sys.path)
import torch

from slimexport.kernels.decoupled_attention import decoupled_attention_ref, decoupled_attention_triton

HEADS = 8
TEXT_TOKENS = 77
# (kind, width, tokens per image, r_qk, r_vo): slim ranks and, for comparison, the dense head size d = width / 8.
SHAPES = [
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


def cases(batches: list[int], smoke: bool = False) -> list[dict]:
    if smoke:
        return [{"name": "smoke self N70 r24/40", "batch": 1, "heads": 2, "n": 70, "s": 70, "r_qk": 24,
                 "r_vo": 40, "d": 40}]
    out = []
    for images in batches:
        unet_batch = 2 * images
        for kind, width, tokens, r_qk, r_vo in SHAPES:
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


def setup(case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, H, N, S = case["batch"], case["heads"], case["n"], case["s"]
    r_qk, r_vo = case["r_qk"], case["r_vo"]
    scale = case["d"] ** -0.5
    # The processor's layout: [B, N, H, r] memory viewed as [B, H, N, r].
    q = torch.randn(B, N, H, r_qk, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, S, H, r_qk, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, S, H, r_vo, device=device, dtype=dtype).transpose(1, 2)

    def check() -> float:
        return bench_kernels.rel_err(decoupled_attention_triton(q, k, v, scale),
                                     decoupled_attention_ref(q.float(), k.float(), v.float(), scale))

    note = sdpa_backends(q, k, v, scale) if device.type == "cuda" else ""
    return {"ref": lambda: decoupled_attention_ref(q, k, v, scale),
            "triton": lambda: decoupled_attention_triton(q, k, v, scale),
            "check": check, "flops": 2.0 * B * H * N * S * (r_qk + r_vo), "note": note}


if __name__ == "__main__":
    sys.exit(bench_kernels.main(ops_default=("decoupled_attention",)))
