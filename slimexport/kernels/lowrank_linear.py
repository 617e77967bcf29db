"""Op 3: fused low-rank linear layer ``y = (x U) V + b``.

A layer factored to rank ``r`` (``W ≈ U V`` with ``U: [K, r]``, ``V: [r, N]``) runs in torch as two GEMMs: the
``[M, r]`` intermediate ``t = x U`` goes to memory and is read back. The Triton twin keeps ``t`` on chip: per
program a ``BLOCK_M`` block of rows computes

    t[Mb, :] = Σ_k x[Mb, k] U[k, :]          (fp32 accumulation over K in BLOCK_K steps, r padded to BLOCK_R)
    y[Mb, Nb] = t[Mb, :] V[:, Nb] + b[Nb]    (for each BLOCK_N column block)

``t`` is rounded to the input dtype before the second product (tensor-core operands; the reference's
intermediate is rounded the same way). When the row blocks are too few to fill the GPU, the column blocks are
split among ``SPLIT_N`` programs per row block, each recomputing its ``t`` (``K·r`` extra multiply-adds per row,
cheap against reading ``x`` once more from L2). The rank is padded to a power of two (at least 16) with masked
loads (in groups of ``R_VEC`` channels, so that loads of U stay 16-byte vectors); ranks up to :data:`MAX_RANK`
are taken, larger ones use the reference.

Measured (H200, torch 2.11, triton 3.6, fp16; tools/bench_lowrank_linear.py): in GPU time 0.6-1.4× the speed
of the two cuBLAS GEMMs (1.2-1.4× at ranks 64-128 with many rows, 0.6-0.8× at rank 256 or where the rank pads
far, 160 → 256); in eager calls 0.4-0.7×, since a Triton launch from Python costs about 60 µs here against
30-50 µs for the reference's two GEMMs. ``AUTO`` picks per shape; under CUDA graphs the launch cost vanishes.
"""

from __future__ import annotations

import functools

import torch

from slimexport.errors import UsageError
from slimexport.kernels.dispatch import (
    KernelImpl,
    TunedLauncher,
    autotune_enabled,
    check_triton_device,
    dispatch,
    fits_int32,
    in_graph_capture,
    interpreter_enabled,
    on_device,
    require_triton,
    sm_count,
    vector_channels,
)

OP_NAME = "lowrank_linear"
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest rank the kernel keeps on chip: a [BLOCK_M, 256] fp32 intermediate plus a [256, BLOCK_N] tile of V.
MAX_RANK = 256
MIN_DOT_DIM = 16  # smallest tl.dot operand dimension
# Block sizes for Triton's CPU interpreter (tests): small, so that test shapes span several blocks.
# ``None``: the interpreter takes the autotuned GPU launch path instead (a test of that path's host code).
INTERPRETER_CONFIG: dict | None = {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 16, "SPLIT_N": 2}


def _check(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, where: str) -> None:
    if x.dim() < 1 or u.dim() != 2 or v.dim() != 2 or x.shape[-1] != u.shape[0] or u.shape[1] != v.shape[0]:
        raise UsageError(f"{where}: shapes do not chain: x {tuple(x.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}",
                         "expected x [..., K], u [K, r], v [r, N]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != v.shape[1]):
        raise UsageError(f"{where}: bias has shape {tuple(bias.shape)}, v {tuple(v.shape)}", f"expected bias [{v.shape[1]}]")
    tensors = [x, u, v] + ([bias] if bias is not None else [])
    if len({t.dtype for t in tensors}) != 1 or x.dtype not in INPUT_DTYPES:
        raise UsageError(f"{where}: dtypes {[str(t.dtype) for t in tensors]}",
                         "x, u, v and bias must share one dtype: float16, bfloat16 or float32")
    if len({t.device for t in tensors}) != 1:
        raise UsageError(f"{where}: tensors on {[str(t.device) for t in tensors]}", "put them on one device")


def triton_supports(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the Triton twin takes these tensors (rank up to :data:`MAX_RANK`, int32-addressable)."""
    m = x.numel() // max(1, x.shape[-1])
    return 0 < u.shape[1] <= MAX_RANK and fits_int32(x, u, v) and m * v.shape[1] <= 2**31 - 1


def lowrank_linear_ref(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(x @ u) @ v + bias`` with two torch matmuls (the reference).

    Args:
        x: ``[..., K]``; u: ``[K, r]``; v: ``[r, N]``; bias: ``[N]`` or ``None``; one dtype.

    Returns:
        ``[..., N]`` in the inputs' dtype.
    """
    y = (x @ u) @ v  # any leading dims, no reshapes: a traced graph keeps its static channel sizes
    return y if bias is None else y + bias


@functools.cache
def _kernels(interpret: bool, autotune: bool = True):
    """Compile-on-demand Triton kernel: ``(jit kernel, TunedLauncher)``. Imports triton.

    Built once per mode: ``triton.jit`` decides between compiled and interpreted kernels when it decorates, so
    ``interpret`` (``TRITON_INTERPRET`` at the call) keys the cache; ``autotune=False`` keeps the first config.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def lowrank_kernel(x_ptr, u_ptr, v_ptr, b_ptr, y_ptr, M, K, N, R, M_bucket,
                       stride_xm, stride_xk, stride_uk, stride_ur, stride_vr, stride_vn, stride_ym, stride_yn,
                       HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, R_VEC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        num_n_programs = tl.num_programs(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        # The rank mask in groups of R_VEC (R is a multiple of it): constant over 8 channels, it lets the
        # compiler load U in 16-byte vectors instead of single elements.
        mask_r = (offs_r // R_VEC) < (R // R_VEC)

        # t = x[Mb, :] @ U, fp32 accumulation.
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        u_ptrs = u_ptr + offs_k[:, None] * stride_uk + offs_r[None, :] * stride_ur
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            xb = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            ub = tl.load(u_ptrs + k0 * stride_uk, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            t = tl.dot(xb, ub, t, input_precision=PRECISION)
        t_in = t.to(x_ptr.dtype.element_ty)

        # y[Mb, Nb] = t @ V[:, Nb] + b[Nb] for this program's column blocks.
        num_n_blocks = tl.cdiv(N, BLOCK_N)
        for nb in range(pid_n, num_n_blocks, num_n_programs):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            vb = tl.load(v_ptr + offs_r[:, None] * stride_vr + offs_n[None, :] * stride_vn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            y = tl.dot(t_in, vb, input_precision=PRECISION)
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                     y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_N": 128}, num_warps=4, num_stages=4),
    ]

    def prune(configs, named_args, **kwargs):
        # A 256-wide rank: the [128, 256] fp32 intermediate overflows the registers of 8 warps; keep BLOCK_M 64
        # (the last configs). Without autotuning: the first config that fits.
        wide = {**named_args, **kwargs}["BLOCK_R"] >= 256  # constexpr arguments come as keywords
        kept = [c for c in configs if not wide or c.kwargs["BLOCK_M"] <= 64]
        return kept if autotune else kept[:1]

    tuned = triton.autotune(configs=configs, key=["M_bucket", "K", "N", "BLOCK_R"],
                            prune_configs_by={"early_config_prune": prune})(lowrank_kernel)
    return lowrank_kernel, TunedLauncher(lowrank_kernel, tuned)


def _pow2_block(r: int) -> int:
    return max(MIN_DOT_DIM, 1 << max(0, (r - 1).bit_length()))


def _split_n(m_blocks: int, n_blocks: int, device: torch.device) -> int:
    """Column-block splits so that row blocks × splits make about one wave of the GPU."""
    return max(1, min(n_blocks, sm_count(device) // max(1, m_blocks)))


def lowrank_linear_triton(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """``(x @ u) @ v + bias`` with the fused Triton kernel (the intermediate stays on chip). Same contract."""
    require_triton(OP_NAME)
    _check(x, u, v, bias, "lowrank_linear_triton")
    check_triton_device("lowrank_linear_triton", x, u, v)
    if not triton_supports(x, u, v, bias):
        raise UsageError(f"lowrank_linear_triton: rank {u.shape[1]} or size x {tuple(x.shape)} is outside the "
                         f"kernel's range (rank 1..{MAX_RANK}, fewer than 2**31 elements)", "use impl='torch'")
    K, R = u.shape
    N = v.shape[1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(*x.shape[:-1], N)
    kernel, launch = _kernels(interpreter_enabled(), autotune_enabled())
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    b = bias if bias is not None else y  # a valid pointer, never read
    m_bucket = 1 << max(0, (M - 1).bit_length())  # autotune key: power-of-two bucket of the row count
    args = (x2, u, v, b, y, M, K, N, R, m_bucket, *x2.stride(), *u.stride(), *v.stride(), *y.stride())
    consts = {"HAS_BIAS": bias is not None, "BLOCK_R": _pow2_block(R), "R_VEC": vector_channels(R),
              "PRECISION": precision}
    cfg = INTERPRETER_CONFIG
    if x.is_cuda or cfg is None:  # autotuned (on CPU only under the interpreter, when a test asks for it)
        def grid(meta):
            m_blocks = -(-M // meta["BLOCK_M"])
            return (m_blocks, _split_n(m_blocks, -(-N // meta["BLOCK_N"]), x.device))

        key = (m_bucket, K, N, consts["BLOCK_R"], consts["R_VEC"], x.dtype, x.device)
        with on_device(x.device):
            launch(key, grid, args, consts)
    else:  # Triton's CPU interpreter (TRITON_INTERPRET=1), fixed small blocks
        grid = (-(-M // cfg["BLOCK_M"]), cfg["SPLIT_N"])
        kernel[grid](*args, **consts, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"])
    return y.reshape(*x.shape[:-1], N)


def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                   impl: KernelImpl | str = KernelImpl.AUTO) -> torch.Tensor:
    """``y = (x @ u) @ v + bias``, reference or fused Triton kernel.

    Args:
        x: ``[..., K]``; u: ``[K, r]``; v: ``[r, N]``; bias: ``[N]`` or ``None``; one dtype (fp16/bf16/fp32).
        impl: see :func:`slimexport.kernels.dispatch.dispatch`.

    Returns:
        ``[..., N]`` in the inputs' dtype.
    """
    if in_graph_capture():
        return lowrank_linear_ref(x, u, v, bias)
    _check(x, u, v, bias, "lowrank_linear")
    x2 = x.reshape(-1, x.shape[-1])
    y = dispatch(OP_NAME, lowrank_linear_ref, lowrank_linear_triton, x2, u, v, bias, impl=impl,
                 supported=triton_supports(x2, u, v, bias))
    return y.reshape(*x.shape[:-1], v.shape[1])
