"""Op 1: streaming uncentered covariance, ``acc += xᵀx`` in fp32.

Calibration (method doc §4) accumulates ``C = Σ xᵀx`` of fp16 activations into fp32 ``[n, n]`` accumulators, one
per timestep bin, for n up to 5,120 (the GEGLU output at width 1,280). The reference upcasts ``x`` to fp32 and
calls ``addmm_``: a full ``n × n`` product that materialises an fp32 copy of ``x``.

The Triton twin reads ``x`` in its own dtype (fp16/bf16 tensor-core products, fp32 accumulation) and uses the
symmetry of ``xᵀx``: only tiles ``(i, j)`` with ``i <= j`` are computed, and an off-diagonal tile's result is
added to both ``acc[i, j]`` and, transposed, to ``acc[j, i]``. That halves the multiply-adds. A diagonal tile is
averaged with its own transpose before it is added, so without token splits a symmetric ``acc`` stays exactly
symmetric whatever order the matrix product sums in (Triton's CPU interpreter calls numpy's BLAS, which does not
promise a symmetric ``aᵀa``). Tile ``(i, j)`` is

    acc[I, J] += Σ_t x[t, I]ᵀ x[t, J]          (I, J: the channel ranges of tiles i and j)

a ``[BLOCK, T] @ [T, BLOCK]`` product over the token axis. When the tile pairs are too few to fill the GPU
(n = 320: 15 pairs of 64-wide tiles), the token axis is split into ``SPLIT`` ranges, one program each, which add
their partial tiles with atomic adds; the result then differs from a one-pass sum by fp32 rounding order only.
fp32 inputs use IEEE fp32 products (as ``addmm_`` does with TF32 off).

Measured (H200, torch 2.11, triton 3.6, fp16 x; tools/bench_cov_accumulate.py): 1.5-15× faster than the
reference in eager calls and 8-16× in GPU time (the reference runs an fp32 GEMM on an fp32 copy of x; the kernel
runs fp16 tensor-core products on half the tiles), 450-800 TFLOP/s-equivalent at n ≥ 1280.
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
)

OP_NAME = "cov_accumulate"
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Split the token axis only while each split keeps at least this many BLOCK_K-token steps: shorter splits spend
# more on the atomic read-modify-write of their tile than they save.
MIN_K_STEPS_PER_SPLIT = 8
# Tile sizes for Triton's CPU interpreter (tests): small, so that test shapes span several tiles and splits.
# ``None``: the interpreter takes the autotuned GPU launch path instead (a test of that path's host code).
INTERPRETER_CONFIG: dict | None = {"BLOCK": 16, "BLOCK_K": 16, "SPLIT": 2}


def _target(acc: torch.Tensor, x: torch.Tensor, bins: int | None, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return the ``[n, n]`` accumulator to add into and ``x`` as ``[tokens, n]``."""
    if acc.dtype != torch.float32:
        raise UsageError(f"{where}: acc has dtype {acc.dtype}", "the accumulator must be torch.float32")
    if bins is None:
        if acc.dim() != 2:
            raise UsageError(f"{where}: acc has shape {tuple(acc.shape)} and no bin index was given",
                             "pass acc as [n, n], or [num_bins, n, n] with bins=<int>")
        target = acc
    else:
        if acc.dim() != 3:
            raise UsageError(f"{where}: bins={bins} needs acc as [num_bins, n, n], got {tuple(acc.shape)}",
                             "pass the binned accumulator or drop the bin index")
        if not 0 <= int(bins) < acc.shape[0]:
            raise UsageError(f"{where}: bins={bins} is outside 0..{acc.shape[0] - 1}", "pass a valid bin index")
        target = acc[int(bins)]
    n = target.shape[0]
    if target.shape[1] != n:
        raise UsageError(f"{where}: acc is not square: {tuple(target.shape)}", "pass an [n, n] accumulator")
    if x.dim() < 2 or x.shape[-1] != n:
        raise UsageError(f"{where}: x has shape {tuple(x.shape)} but acc is [{n}, {n}]",
                         f"pass x as [tokens, {n}] (leading dimensions are flattened)")
    if x.dtype not in INPUT_DTYPES:
        raise UsageError(f"{where}: x has dtype {x.dtype}", "expected float16, bfloat16 or float32")
    if x.device != target.device:
        raise UsageError(f"{where}: x is on {x.device} and acc on {target.device}", "put both on one device")
    return target, x.reshape(-1, n)


def cov_accumulate_ref(acc: torch.Tensor, x: torch.Tensor, bins: int | None = None) -> torch.Tensor:
    """``acc += xᵀx`` in fp32 with torch (the reference).

    Args:
        acc: fp32 ``[n, n]``, or ``[num_bins, n, n]`` with ``bins`` the bin to add into; updated in place.
        x: fp16/bf16/fp32 ``[tokens, n]`` (leading dimensions are flattened into tokens).
        bins: bin index into a 3-D ``acc``, or ``None``.

    Returns:
        ``acc`` (the whole tensor, as passed).
    """
    target, x2 = _target(acc, x, bins, "cov_accumulate_ref")
    xf = x2.float()
    target.addmm_(xf.T, xf)
    return acc


@functools.cache
def _kernels(interpret: bool, autotune: bool = True):
    """Compile-on-demand Triton kernel: ``(jit kernel, TunedLauncher)``. Imports triton.

    Built once per mode: ``triton.jit`` decides between compiled and interpreted kernels when it decorates, so
    ``interpret`` (``TRITON_INTERPRET`` at the call) keys the cache; ``autotune=False`` keeps the first config.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def cov_kernel(acc_ptr, x_ptr, T, n, T_bucket,
                   stride_am, stride_an, stride_xt, stride_xn,
                   BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        # Program (pid, split): tile pair (ti, tj) = divmod(pid, num_tiles), lower-triangle pairs exit at once.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        num_tiles = tl.cdiv(n, BLOCK)
        ti = pid // num_tiles
        tj = pid % num_tiles
        if tj >= ti:
            offs_i = ti * BLOCK + tl.arange(0, BLOCK)
            offs_j = tj * BLOCK + tl.arange(0, BLOCK)
            offs_k = tl.arange(0, BLOCK_K)
            mask_i = offs_i < n
            mask_j = offs_j < n
            # This split's token range, a whole number of BLOCK_K steps.
            k_steps = tl.cdiv(T, BLOCK_K)
            steps_per_split = tl.cdiv(k_steps, num_splits)
            k_begin = split * steps_per_split * BLOCK_K
            k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, T)
            # a: x[k, I] as [BLOCK_K, BLOCK] (transposed in the product); b: x[k, J] as [BLOCK_K, BLOCK].
            a_ptrs = x_ptr + offs_k[:, None] * stride_xt + offs_i[None, :] * stride_xn
            b_ptrs = x_ptr + offs_k[:, None] * stride_xt + offs_j[None, :] * stride_xn
            tile = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                mask_k = (k0 + offs_k) < k_end
                a = tl.load(a_ptrs + k0 * stride_xt, mask=mask_k[:, None] & mask_i[None, :], other=0.0)
                b = tl.load(b_ptrs + k0 * stride_xt, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
                tile = tl.dot(tl.trans(a), b, tile, input_precision=PRECISION)
            if tj == ti:
                # A diagonal tile is symmetric in exact arithmetic but not after rounding: a GEMM may sum its
                # (p, q) and (q, p) entries in different orders. Averaging it with its transpose makes the two
                # entries one value (fp addition commutes; the halving is exact), so acc stays exactly symmetric.
                tile = (tile + tl.trans(tile)) * 0.5
            mask_ij = mask_i[:, None] & mask_j[None, :]
            mask_ji = mask_j[:, None] & mask_i[None, :]
            ptr_ij = acc_ptr + offs_i[:, None] * stride_am + offs_j[None, :] * stride_an
            ptr_ji = acc_ptr + offs_j[:, None] * stride_am + offs_i[None, :] * stride_an
            if num_splits == 1:
                tl.store(ptr_ij, tl.load(ptr_ij, mask=mask_ij, other=0.0) + tile, mask=mask_ij)
                if tj > ti:
                    tl.store(ptr_ji, tl.load(ptr_ji, mask=mask_ji, other=0.0) + tl.trans(tile), mask=mask_ji)
            else:
                tl.atomic_add(ptr_ij, tile, mask=mask_ij, sem="relaxed")
                if tj > ti:
                    tl.atomic_add(ptr_ji, tl.trans(tile), mask=mask_ji, sem="relaxed")

    configs = [
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]

    def prune(configs, named_args, **kwargs):
        return configs if autotune else configs[:1]

    # restore_value: autotuning runs the kernel several times; acc must hold one addition afterwards.
    tuned = triton.autotune(configs=configs, key=["n", "T_bucket"], restore_value=["acc_ptr"],
                            prune_configs_by={"early_config_prune": prune})(cov_kernel)
    return cov_kernel, TunedLauncher(cov_kernel, tuned)


def _num_splits(num_tiles: int, T: int, block_k: int, device: torch.device) -> int:
    """Token-axis splits so that upper-triangle tile pairs × splits fill about two waves of the GPU."""
    pairs = num_tiles * (num_tiles + 1) // 2
    want = -(-2 * sm_count(device) // pairs)
    most = max(1, -(-T // block_k) // MIN_K_STEPS_PER_SPLIT)
    return max(1, min(want, most))


def cov_accumulate_triton(acc: torch.Tensor, x: torch.Tensor, bins: int | None = None) -> torch.Tensor:
    """``acc += xᵀx`` with the Triton kernel (upper-triangle tiles, mirrored). Same contract as the reference."""
    require_triton(OP_NAME)
    target, x2 = _target(acc, x, bins, "cov_accumulate_triton")
    check_triton_device("cov_accumulate_triton", target, x2)
    T, n = x2.shape
    if T == 0 or n == 0:
        return acc
    if not fits_int32(target, x2):
        raise UsageError(f"cov_accumulate_triton: x {tuple(x2.shape)} or acc {tuple(target.shape)} has 2**31 "
                         "elements or more", "split x into chunks of tokens, or use impl='torch'")
    kernel, launch = _kernels(interpreter_enabled(), autotune_enabled())
    precision = "ieee" if x2.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    t_bucket = 1 << max(0, (T - 1).bit_length())
    args = (target, x2, T, n, t_bucket, target.stride(0), target.stride(1), x2.stride(0), x2.stride(1))
    cfg = INTERPRETER_CONFIG
    if x2.is_cuda or cfg is None:  # autotuned (on CPU only under the interpreter, when a test asks for it)
        def grid(meta):
            tiles = -(-n // meta["BLOCK"])
            return (tiles * tiles, _num_splits(tiles, T, meta["BLOCK_K"], x2.device))

        with on_device(x2.device):
            launch((n, t_bucket, x2.dtype, x2.device), grid, args, {"PRECISION": precision})
    else:  # Triton's CPU interpreter (TRITON_INTERPRET=1), fixed small tiles
        tiles = -(-n // cfg["BLOCK"])
        kernel[(tiles * tiles, cfg["SPLIT"])](*args, BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], PRECISION=precision)
    return acc


def cov_accumulate(acc: torch.Tensor, x: torch.Tensor, bin: int | None = None,
                   impl: KernelImpl | str = KernelImpl.AUTO) -> torch.Tensor:
    """``acc += xᵀx`` in fp32 (``acc[bin] += xᵀx`` for a binned accumulator), reference or Triton.

    Args:
        acc: fp32 ``[n, n]`` or ``[num_bins, n, n]``; updated in place.
        x: fp16/bf16/fp32 ``[..., n]``; leading dimensions are tokens.
        bin: the bin of a 3-D ``acc``; ``None`` for a 2-D one.
        impl: see :func:`slimexport.kernels.dispatch.dispatch`.

    Returns:
        ``acc``.
    """
    if in_graph_capture():
        return cov_accumulate_ref(acc, x, bin)
    target, x2 = _target(acc, x, bin, "cov_accumulate")
    dispatch(OP_NAME, cov_accumulate_ref, cov_accumulate_triton, target, x2, impl=impl, mutates=(0,),
             supported=fits_int32(target, x2))
    return acc
