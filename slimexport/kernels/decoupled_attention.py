"""Op 2: attention with decoupled head sizes (inference forward), flash-style.

After whitening-SVD (method doc §6.2-6.3, §8) a head's queries and keys have ``r_qk`` channels and its values
``r_vo``, each a multiple of 8 from 8 to 160 and usually different, while the logits keep the *dense* layer's
scale ``d**-0.5``. The reference is ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.

The Triton twin is the online-softmax forward of FlashAttention: per program a ``BLOCK_M`` block of queries of
one (batch, head) walks over the keys in ``BLOCK_N`` blocks, keeping a running row maximum ``m``, a running
denominator ``l`` and an unnormalised output ``acc`` in fp32:

    s    = q kᵀ;  c = scale · log2(e) > 0                (base-2 logits: exp2 is the hardware exponential)
    m'   = max(m, c · rowmax(s));  α = 2^(m - m');  p = 2^(c s - m')      (one FMA per logit)
    l    = α l + rowsum(p);    acc = α acc + p v;       m = m'
    o    = acc / l

The score matrix never reaches memory. Head sizes are padded inside the kernel to powers of two (at least 16,
the ``tl.dot`` minimum), with masked loads, so ``r_qk = 24`` runs as 32 and ``r_vo = 40`` as 64, and no padded
copy of q, k or v is made. The head-size masks are built in groups of 8 channels (``DQK_VEC``/``DV_VEC``, the
largest power of two ≤ 8 dividing the size): a mask like ``d < 40`` is otherwise opaque to Triton's alignment
analysis and every element becomes its own 2-byte load (no ``cp.async``), about 2× slower on an H200. Keys past
``S`` (the last block when ``S`` is no multiple of ``BLOCK_N``, e.g. the 77 text tokens of cross-attention) get
logit ``-inf``. The output is written as ``[B, N, H, r_vo]`` memory and returned as its ``[B, H, N, r_vo]``
view, so that the attention processor's ``transpose(1, 2).reshape`` to ``[B, N, H·r_vo]`` costs no copy.

Measured (H200, torch 2.11, triton 3.6, fp16, GPU time from CUDA graphs; tools/bench_decoupled_attention.py):
against SDPA's memory-efficient kernel (the one it takes when r_vo ≠ r_qk) the kernel runs at 0.8-1.4× its
speed (N = 1024 and 256 at parity or faster, N = 4096 self-attention about 0.8×); against flash (r_vo = r_qk) at
0.4-1.1×. The block configs matter little (a sweep of 27 moved it by 5%): the inner loop runs at about
200 TFLOP/s of padded tensor-core work. ``AUTO`` therefore keeps SDPA wherever it is faster.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from slimexport.errors import UsageError
from slimexport.kernels.dispatch import (
    KernelImpl,
    TunedLauncher,
    autotune_enabled,
    check_triton_device,
    dispatch,
    fits_int32,
    forced_sdpa_pad,
    in_graph_capture,
    interpreter_enabled,
    on_device,
    require_triton,
    vector_channels,
)

OP_NAME = "decoupled_attention"
PAD_ENV_VAR = "SLIMEXPORT_SDPA_PAD"  # "1": pad unequal head sizes on CUDA too (always on the CPU)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634  # log2(e): softmax with exp2 instead of exp
# Largest head size the kernel takes: 160 pads to 256, the largest power of two whose tiles fit on chip.
MAX_HEAD_DIM = 256
# Smallest tl.dot operand dimension.
MIN_DOT_DIM = 16
# Block sizes for Triton's CPU interpreter (tests): small, so that test shapes span several blocks.
# ``None``: the interpreter takes the autotuned GPU launch path instead (a test of that path's host code).
INTERPRETER_CONFIG: dict | None = {"BLOCK_M": 16, "BLOCK_N": 16}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UsageError(f"{where}: q, k, v must be [B, H, tokens, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}", "reshape to 4-D")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise UsageError(f"{where}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}", "expected q [B, H, N, r_qk], k [B, H, S, r_qk], v [B, H, S, r_vo]")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in INPUT_DTYPES:
        raise UsageError(f"{where}: dtypes {q.dtype}, {k.dtype}, {v.dtype}",
                         "q, k and v must share one dtype: float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise UsageError(f"{where}: q, k, v on {q.device}, {k.device}, {v.device}", "put them on one device")


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> bool:
    """Whether the Triton twin takes these arguments: head sizes up to 256, int32-addressable, at least one key,
    a finite positive scale (the kernel takes the row maximum before scaling)."""
    return (q.dim() == 4 and v.dim() == 4 and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM
            and k.shape[2] > 0 and fits_int32(q, k, v) and math.isfinite(scale) and scale > 0)


def decoupled_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention with torch's SDPA (the reference).

    Args:
        q: ``[B, H, N, r_qk]``; k: ``[B, H, S, r_qk]``; v: ``[B, H, S, r_vo]``; one dtype (fp16/bf16/fp32).
        scale: the logit scale (the dense layer's ``head_dim ** -0.5``).

    Returns:
        ``[B, H, N, r_vo]`` in the inputs' dtype.
    """
    rq, rv = q.shape[-1], v.shape[-1]
    # ONNX export and jit tracing keep the plain attention (MatMul/Softmax with the slim head sizes); torch.export and
    # torch.compile (AOTInductor, inductor) take the padding: their CPU lowering has the same fused-kernel restriction.
    if rq != rv and (q.device.type == "cpu" or sdpa_pad_enabled()) and not _plain_graph():
        # The CPU's fused SDPA kernel takes one head size for q, k and v; with two it falls back to the math path
        # (materialised N×S scores: 2.3x slower for the slim tiny UNet, tools/bench_sdpa_pad.py). Zero
        # columns change neither q·kᵀ nor the kept output columns, so pad to the larger size and slice. FlashAttention-2
        # kernels on CUDA have the same restriction (SDPA then picks another kernel); whether padding pays there is
        # unmeasured, so it is opt-in: force_kernels(sdpa_pad=True) or SLIMEXPORT_SDPA_PAD=1 (the device check's
        # kernels_e2e section).
        d = max(rq, rv)
        q, k, v = F.pad(q, (0, d - rq)), F.pad(k, (0, d - rq)), F.pad(v, (0, d - rv))
        return F.scaled_dot_product_attention(q, k, v, scale=float(scale))[..., :rv]
    return F.scaled_dot_product_attention(q, k, v, scale=float(scale))


def sdpa_pad_enabled() -> bool:
    """Whether the reference pads unequal head sizes on CUDA: :func:`force_kernels`'s ``sdpa_pad`` inside one, else
    ``$SLIMEXPORT_SDPA_PAD == "1"``."""
    forced = forced_sdpa_pad()
    return forced if forced is not None else os.environ.get(PAD_ENV_VAR) == "1"


def _plain_graph() -> bool:
    """True while torch exports to ONNX or traces with ``torch.jit``: the graph keeps the plain attention."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


@functools.cache
def _kernels(interpret: bool, autotune: bool = True):
    """Compile-on-demand Triton kernel: ``(jit kernel, TunedLauncher)``. Imports triton.

    Built once per mode: ``triton.jit`` decides between compiled and interpreted kernels when it decorates, so
    ``interpret`` (``TRITON_INTERPRET`` at the call) keys the cache; ``autotune=False`` keeps the first config.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qk_scale,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_ks, stride_kd,
                        stride_vb, stride_vh, stride_vs, stride_vd,
                        stride_ob, stride_oh, stride_on, stride_od,
                        H, N, S, R_QK, R_VO,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                        DQK_VEC: tl.constexpr, DV_VEC: tl.constexpr,
                        EVEN_S: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_dq = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_m = offs_m < N
        # Head-size masks in groups of *_VEC channels (R_QK and R_VO are multiples of them): a mask that is
        # constant over 8 channels lets the compiler load 16-byte vectors instead of single elements.
        mask_dq = (offs_dq // DQK_VEC) < (R_QK // DQK_VEC)
        mask_dv = (offs_dv // DV_VEC) < (R_VO // DV_VEC)

        q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_dq[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_dq[None, :], other=0.0)
        # Keys are read as kᵀ, [BLOCK_DQK, BLOCK_N]; values as [BLOCK_N, BLOCK_DV].
        kt_ptrs = k_ptr + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_ks + offs_dq[:, None] * stride_kd
        v_ptrs = v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        for start in range(0, S, BLOCK_N):
            if EVEN_S:
                kt = tl.load(kt_ptrs + start * stride_ks, mask=mask_dq[:, None], other=0.0)
                v = tl.load(v_ptrs + start * stride_vs, mask=mask_dv[None, :], other=0.0)
            else:
                mask_n = (start + offs_n) < S
                kt = tl.load(kt_ptrs + start * stride_ks, mask=mask_dq[:, None] & mask_n[None, :], other=0.0)
                v = tl.load(v_ptrs + start * stride_vs, mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION)
            if not EVEN_S:
                s = tl.where(mask_n[None, :], s, float("-inf"))
            # qk_scale > 0, so max(s) · qk_scale is the row maximum of the scaled logits; one FMA per logit.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])

    with_heuristics = triton.heuristics({"EVEN_S": lambda a: a["S"] % a["BLOCK_N"] == 0})(attn_fwd_kernel)

    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]

    def prune(configs, named_args, **kwargs):
        # 256-wide heads: a 128 × 256 fp32 accumulator and 128 × 256 key/value tiles overflow registers and
        # shared memory; keep the small tiles (the last config always fits). Without autotuning: the first fit.
        named = {**named_args, **kwargs}  # the autotuner passes constexpr arguments as keywords
        widest = max(named["BLOCK_DQK"], named["BLOCK_DV"])
        kept = [c for c in configs if widest < 256 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return kept if autotune else kept[:1]

    tuned = triton.autotune(configs=configs, key=["N", "S", "BLOCK_DQK", "BLOCK_DV"],
                            prune_configs_by={"early_config_prune": prune})(with_heuristics)
    return attn_fwd_kernel, TunedLauncher(attn_fwd_kernel, tuned)


def _pow2_block(r: int) -> int:
    return max(MIN_DOT_DIM, 1 << max(0, (r - 1).bit_length()))


def decoupled_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention with the Triton flash-style kernel. Same contract as the reference.

    Any strides are accepted (the slim attention processor passes transposed views). The result is a
    ``[B, H, N, r_vo]`` view of contiguous ``[B, N, H, r_vo]`` memory.
    """
    require_triton(OP_NAME)
    _check(q, k, v, "decoupled_attention_triton")
    check_triton_device("decoupled_attention_triton", q, k, v)
    if not triton_supports(q, k, v, float(scale)):
        raise UsageError(f"decoupled_attention_triton: q {tuple(q.shape)}, v {tuple(v.shape)}, k {tuple(k.shape)}, "
                         f"scale={scale} are outside the kernel's range (head sizes 1..{MAX_HEAD_DIM}, at least one "
                         "key, fewer than 2**31 elements, finite scale > 0)", "use impl='torch'")
    B, H, N, r_qk = q.shape
    S, r_vo = k.shape[2], v.shape[-1]
    out = torch.empty((B, N, H, r_vo), dtype=q.dtype, device=q.device).transpose(1, 2)
    if B * H * N == 0 or r_vo == 0:
        return out
    kernel, launch = _kernels(interpreter_enabled(), autotune_enabled())
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    args = (q, k, v, out, float(scale) * LOG2_E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, N, S, r_qk, r_vo)
    block_dqk, block_dv = _pow2_block(r_qk), _pow2_block(r_vo)
    vec_qk, vec_vo = vector_channels(r_qk), vector_channels(r_vo)
    consts = {"BLOCK_DQK": block_dqk, "BLOCK_DV": block_dv, "DQK_VEC": vec_qk, "DV_VEC": vec_vo,
              "PRECISION": precision}
    cfg = INTERPRETER_CONFIG
    if q.is_cuda or cfg is None:  # autotuned (on CPU only under the interpreter, when a test asks for it)
        def grid(meta):
            return (-(-N // meta["BLOCK_M"]), B * H)

        def even_s(config):
            return {"EVEN_S": S % config["BLOCK_N"] == 0}

        key = (N, S, block_dqk, block_dv, vec_qk, vec_vo, q.dtype, q.device)
        with on_device(q.device):
            launch(key, grid, args, consts, derived=even_s)
    else:  # Triton's CPU interpreter (TRITON_INTERPRET=1), fixed small blocks
        kernel[(-(-N // cfg["BLOCK_M"]), B * H)](*args, **consts, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                  EVEN_S=S % cfg["BLOCK_N"] == 0)
    return out


def decoupled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        impl: KernelImpl | str = KernelImpl.AUTO) -> torch.Tensor:
    """Softmax attention ``softmax(q kᵀ · scale) v`` with ``r_vo`` free of ``r_qk``; reference or Triton.

    Usable as ``SlimAttnProcessor(scale, kernel=decoupled_attention)`` (it calls ``kernel(q, k, v, scale)``).

    Args:
        q: ``[B, H, N, r_qk]``; k: ``[B, H, S, r_qk]``; v: ``[B, H, S, r_vo]``; fp16/bf16 (fp32 allowed).
        scale: the logit scale (the dense layer's ``head_dim ** -0.5``).
        impl: see :func:`slimexport.kernels.dispatch.dispatch`.

    Returns:
        ``[B, H, N, r_vo]`` in the inputs' dtype.
    """
    if in_graph_capture():
        return decoupled_attention_ref(q, k, v, scale)
    _check(q, k, v, "decoupled_attention")
    return dispatch(OP_NAME, decoupled_attention_ref, decoupled_attention_triton, q, k, v, float(scale), impl=impl,
                    supported=triton_supports(q, k, v, float(scale)))
