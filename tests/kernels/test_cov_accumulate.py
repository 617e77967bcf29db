"""cov_accumulate: the Triton twin against ``acc.addmm_(x.T.float(), x.float())``."""

import sys

import numpy as np
import pytest
import torch

from slimexport.errors import UsageError
from slimexport.kernels.cov_accumulate import (
    INTERPRETER_CONFIG,
    cov_accumulate,
    cov_accumulate_ref,
    cov_accumulate_triton,
)

# x is upcast to fp32 before the products in both twins, so the products are exact in every input dtype and only
# the fp32 summation order differs: the tolerance scales with the number of tokens.
RTOL = 1e-5


def atol(tokens: int) -> float:
    return 2e-6 * max(tokens, 1) + 1e-6


def make(tokens, n, dtype, device, seed=0, bins=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g).to(dtype)
    a = torch.randn(n, n, generator=g)
    acc = a + a.T  # a symmetric accumulator, as in calibration
    if bins is not None:
        acc = torch.stack([acc + i for i in range(bins)])
    return acc.to(device), x.to(device)


@pytest.fixture(params=[1, 3], ids=["split1", "split3"])
def split(request, monkeypatch):
    """Token-axis splits in the interpreter (1: load/add/store; 3: atomic adds). Ignored on CUDA (heuristic)."""
    monkeypatch.setitem(INTERPRETER_CONFIG, "SPLIT", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens,n", [(37, 40), (5, 8), (70, 33)])
def test_matches_reference(kernel_device, split, dtype, tokens, n):
    acc, x = make(tokens, n, dtype, kernel_device)
    expected = cov_accumulate_ref(acc.clone(), x)
    out = acc.clone()
    returned = cov_accumulate_triton(out, x)
    assert returned is out
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=atol(tokens))


def test_symmetric_and_mirrored(kernel_device, monkeypatch):
    # One pass per tile (no atomics): an off-diagonal tile is computed once and added to both halves, and a
    # diagonal tile is averaged with its transpose, so a symmetric acc stays exactly symmetric (by construction,
    # not by the summation order of the tile products).
    monkeypatch.setitem(INTERPRETER_CONFIG, "SPLIT", 1)
    acc, x = make(45, 40, torch.float32, kernel_device, seed=1)
    cov_accumulate_triton(acc, x)
    assert torch.equal(acc, acc.T)
    torch.testing.assert_close(acc, cov_accumulate_ref(make(45, 40, torch.float32, kernel_device, seed=1)[0], x),
                               rtol=RTOL, atol=atol(45))


def test_symmetric_whatever_the_product_rounding(kernel_device, monkeypatch):
    """The symmetry holds even when the tile product itself is not symmetric (a BLAS may sum the (p, q) and
    (q, p) entries of aᵀa in different orders): here the interpreter's dot adds an asymmetric rounding error."""
    if kernel_device != "cpu":
        pytest.skip("the interpreter's dot is patched")
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        pytest.skip("this triton's interpreter has no InterpreterBuilder.create_dot to patch")
    original = builder.create_dot

    def skewed_dot(self, a, b, d, *args, **kwargs):
        out = original(self, a, b, d, *args, **kwargs)
        data = out.data
        data += np.triu(np.abs(data) * 1e-6, 1).astype(data.dtype)  # only the upper half moves
        return out

    monkeypatch.setattr(builder, "create_dot", skewed_dot)
    monkeypatch.setitem(INTERPRETER_CONFIG, "SPLIT", 1)
    acc, x = make(45, 40, torch.float32, kernel_device, seed=1)
    cov_accumulate_triton(acc, x)
    assert torch.equal(acc, acc.T)


def test_zero_accumulator_is_gram_matrix(kernel_device):
    x = torch.randn(29, 24, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    acc = torch.zeros(24, 24, device=kernel_device)
    cov_accumulate_triton(acc, x)
    torch.testing.assert_close(acc, x.T.double().mm(x.double()).float(), rtol=RTOL, atol=atol(29))


def test_binned_accumulator_touches_one_bin(kernel_device):
    acc, x = make(21, 24, torch.float16, kernel_device, seed=3, bins=3)
    before = acc.clone()
    cov_accumulate_triton(acc, x, 1)
    torch.testing.assert_close(acc[1], cov_accumulate_ref(before[1].clone(), x), rtol=RTOL, atol=atol(21))
    assert torch.equal(acc[0], before[0]) and torch.equal(acc[2], before[2])


def test_streams_over_calls(kernel_device):
    acc, _ = make(1, 20, torch.float32, kernel_device, seed=4)
    expected = acc.clone()
    for i, tokens in enumerate((7, 33, 1)):
        x = torch.randn(tokens, 20, generator=torch.Generator().manual_seed(10 + i)).to(kernel_device)
        cov_accumulate_triton(acc, x)
        cov_accumulate_ref(expected, x)
    torch.testing.assert_close(acc, expected, rtol=RTOL, atol=atol(41))


def test_strided_and_batched_inputs(kernel_device):
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(19, 2 * 24, generator=g).to(kernel_device)
    x = wide[:, ::2]  # column stride 2
    acc = torch.zeros(24, 24, device=kernel_device)
    cov_accumulate_triton(acc, x)
    torch.testing.assert_close(acc, cov_accumulate_ref(torch.zeros_like(acc), x), rtol=RTOL, atol=atol(19))
    batched = torch.randn(2, 9, 24, generator=g).to(kernel_device)  # [B, tokens, n]: flattened
    acc = torch.zeros(24, 24, device=kernel_device)
    cov_accumulate_triton(acc, batched)
    torch.testing.assert_close(acc, cov_accumulate_ref(torch.zeros_like(acc), batched.reshape(18, 24)),
                               rtol=RTOL, atol=atol(18))


def test_no_tokens_is_a_no_op(kernel_device):
    acc, _ = make(1, 16, torch.float32, kernel_device)
    before = acc.clone()
    cov_accumulate_triton(acc, torch.empty(0, 16, device=kernel_device))
    assert torch.equal(acc, before)


@pytest.mark.parametrize("fn", [cov_accumulate_ref, cov_accumulate_triton, cov_accumulate])
def test_bad_arguments_say_what(fn):
    x = torch.randn(4, 8)
    with pytest.raises(UsageError, match="float32"):
        fn(torch.zeros(8, 8, dtype=torch.float64), x)
    with pytest.raises(UsageError, match=r"\[tokens, 8\]"):
        fn(torch.zeros(8, 8), torch.randn(4, 7))
    with pytest.raises(UsageError, match="num_bins"):
        fn(torch.zeros(3, 8, 8), x)
    with pytest.raises(UsageError, match="outside"):
        fn(torch.zeros(3, 8, 8), x, 3)
    with pytest.raises(UsageError, match="dtype"):
        fn(torch.zeros(8, 8), x.to(torch.int32))


def test_package_attribute_is_the_function():
    import slimexport.kernels as kernels  # the op module shares the name (see slimexport/kernels/__init__.py)

    assert kernels.cov_accumulate is cov_accumulate


def test_dispatcher_on_cpu_is_the_reference():
    acc, x = make(13, 12, torch.float16, "cpu", bins=2)
    expected = acc.clone()
    cov_accumulate_ref(expected, x, 1)
    returned = cov_accumulate(acc, x, bin=1)
    assert returned is acc
    assert torch.equal(acc, expected)


def test_autotuned_launch_path(interpreted_autotune):
    """The GPU launch path (autotune over the configs, prune, grid, split heuristic) run by the interpreter."""
    interpreted_autotune(sys.modules["slimexport.kernels.cov_accumulate"])
    acc, x = make(150, 40, torch.float16, "cpu", seed=7)
    expected = cov_accumulate_ref(acc.clone(), x)
    cov_accumulate_triton(acc, x)  # autotuning runs every config on acc: restore_value must undo them
    torch.testing.assert_close(acc, expected, rtol=RTOL, atol=atol(150))
    cov_accumulate_triton(acc, x)  # the remembered config, launched directly
    torch.testing.assert_close(acc, cov_accumulate_ref(expected, x), rtol=RTOL, atol=atol(300))


# ---------------------------------------------------------------------------------------------------- GPU


SD14_SHAPES = [  # (n, tokens) at UNet batch 4 (batch 2 with CFG), 64x64 latents
    (320, 4 * 4096),  # C_X at width 320
    (1280, 4 * 256),  # C_X at width 1280 / C_Z at width 320
    (5120, 4 * 256),  # C_Z (GEGLU output) at width 1280
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n,tokens", SD14_SHAPES)
def test_sd14_shapes_on_gpu(cuda, dtype, n, tokens):
    acc, x = make(tokens, n, dtype, cuda)
    expected = cov_accumulate_ref(acc.clone(), x)
    cov_accumulate_triton(acc, x)
    torch.testing.assert_close(acc, expected, rtol=RTOL, atol=atol(tokens))


@pytest.mark.gpu
def test_auto_dispatch_on_gpu_adds_once(cuda):
    acc, x = make(2048, 640, torch.float16, cuda, bins=2)
    expected = acc.clone()
    cov_accumulate_ref(expected, x, 1)
    cov_accumulate(acc, x, bin=1, impl="auto")  # measures on clones, then adds once
    torch.testing.assert_close(acc, expected, rtol=RTOL, atol=atol(2048))
    cov_accumulate(acc, x, bin=1, impl="triton")
    cov_accumulate_ref(expected, x, 1)
    torch.testing.assert_close(acc, expected, rtol=RTOL, atol=atol(4096))
