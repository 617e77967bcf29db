"""Triton kernels, one op per module, each with a torch reference twin of the same signature.

=====================  ======================================================  ==============================
op                     what                                                    reference
=====================  ======================================================  ==============================
``cov_accumulate``     ``acc += xᵀx`` in fp32, upper-triangle tiles mirrored   ``acc.addmm_(x.T.float(), x.float())``
``decoupled_attention`` flash-style softmax attention, ``r_vo`` ≠ ``r_qk``      ``F.scaled_dot_product_attention``
``lowrank_linear``     ``(x U) V + b`` with the rank-r intermediate on chip    two matmuls
=====================  ======================================================  ==============================

Each op's dispatching function takes ``impl`` (:class:`KernelImpl`: AUTO, TORCH, TRITON); see
:mod:`slimexport.kernels.dispatch` for how AUTO chooses, :func:`force_kernels` to force a choice in a block
of code, and ``SLIMEXPORT_KERNELS``.

Importing this package imports torch and the op modules but not triton: each op module imports triton inside
the function that first builds its kernel. (The op modules are imported here, not on first attribute access,
because each dispatching function shares its module's name: importing ``slimexport.kernels.cov_accumulate``
binds the *module* to the package attribute ``cov_accumulate`` unless the function was bound first, here.)
For the same reason the function ``dispatch`` is not exported: ``slimexport.kernels.dispatch`` is the module;
use ``from slimexport.kernels.dispatch import dispatch``.
"""

from slimexport.kernels.cov_accumulate import cov_accumulate, cov_accumulate_ref, cov_accumulate_triton
from slimexport.kernels.decoupled_attention import (
    decoupled_attention,
    decoupled_attention_ref,
    decoupled_attention_triton,
)
from slimexport.kernels.dispatch import (
    KernelImpl,
    choices,
    choose_impl,
    clear_choices,
    force_kernels,
    triton_available,
)
from slimexport.kernels.lowrank_linear import lowrank_linear, lowrank_linear_ref, lowrank_linear_triton

__all__ = [
    "KernelImpl",
    "choices",
    "choose_impl",
    "clear_choices",
    "cov_accumulate",
    "cov_accumulate_ref",
    "cov_accumulate_triton",
    "decoupled_attention",
    "decoupled_attention_ref",
    "decoupled_attention_triton",
    "force_kernels",
    "lowrank_linear",
    "lowrank_linear_ref",
    "lowrank_linear_triton",
    "triton_available",
]
