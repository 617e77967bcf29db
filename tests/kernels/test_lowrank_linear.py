"""lowrank_linear: the fused Triton twin against ``(x @ u) @ v + b`` in torch."""

import sys

import pytest
import torch

from slimexport.errors import UsageError
from slimexport.kernels.lowrank_linear import (
    INTERPRETER_CONFIG,
    MAX_RANK,
    lowrank_linear,
    lowrank_linear_ref,
    lowrank_linear_triton,
)

# Per input dtype: (rtol, atol) against the fp32 reference on the same (rounded) inputs. 16-bit inputs round the
# rank-r intermediate and the output to the input dtype (the torch reference does the same).
TOL = {torch.float32: (1e-5, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}


def make(M, K, r, N, bias, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    u = torch.randn(K, r, generator=g) / K ** 0.5
    v = torch.randn(r, N, generator=g) / r ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(u), cast(v), cast(b)


def check(out, x, u, v, b):
    expected = lowrank_linear_ref(x.float(), u.float(), v.float(), None if b is None else b.float())
    assert out.shape == expected.shape and out.dtype == x.dtype
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), expected, rtol=rtol, atol=atol)


SHAPES = [  # M, K, r, N, bias: M, K, N no multiple of the block; ranks 8/24/40
    (37, 40, 24, 33, True),
    (5, 19, 8, 70, False),
    (34, 64, 40, 48, True),
]


@pytest.fixture(params=[1, 2], ids=["splitn1", "splitn2"])
def split_n(request, monkeypatch):
    """Column-block splits in the interpreter (ignored on CUDA, where a heuristic sets them)."""
    monkeypatch.setitem(INTERPRETER_CONFIG, "SPLIT_N", request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(kernel_device, split_n, dtype, shape):
    x, u, v, b = make(*shape, dtype, kernel_device)
    check(lowrank_linear_triton(x, u, v, b), x, u, v, b)


def test_leading_dims_and_strides(kernel_device):
    x, u, v, b = make(2 * 9, 24, 16, 20, True, torch.float32, kernel_device, seed=1)
    x3 = x.reshape(2, 9, 24)
    out = lowrank_linear_triton(x3, u, v, b)
    assert out.shape == (2, 9, 20)
    check(out.reshape(18, 20), x, u, v, b)
    ut = u.T.contiguous().T  # column-major U
    check(lowrank_linear_triton(x, ut, v, b), x, ut, v, b)


def test_rank_beyond_kernel_range(kernel_device):
    x, u, v, b = make(4, 8, MAX_RANK + 8, 8, True, torch.float32, kernel_device)
    with pytest.raises(UsageError, match="outside the kernel's range"):
        lowrank_linear_triton(x, u, v, b)
    torch.testing.assert_close(lowrank_linear(x, u, v, b), lowrank_linear_ref(x, u, v, b))  # AUTO: reference


@pytest.mark.parametrize("fn", [lowrank_linear_triton, lowrank_linear])
def test_bad_arguments_say_what(fn):
    x, u, v, b = make(4, 8, 16, 12, True, torch.float32, "cpu")
    with pytest.raises(UsageError, match="do not chain"):
        fn(x, u[:7], v, b)
    with pytest.raises(UsageError, match="bias"):
        fn(x, u, v, b[:5])
    with pytest.raises(UsageError, match="dtype"):
        fn(x, u.half(), v, b)


def test_dispatcher_on_cpu_is_the_reference():
    x, u, v, b = make(2 * 7, 16, 8, 12, True, torch.float16, "cpu")
    x3 = x.reshape(2, 7, 16)
    assert torch.equal(lowrank_linear(x3, u, v, b), lowrank_linear_ref(x3, u, v, b))
    assert torch.equal(lowrank_linear(x, u, v), lowrank_linear_ref(x, u, v, None))


def test_autotuned_launch_path(interpreted_autotune):
    """The GPU launch path (autotune over the configs, prune, grid, split heuristic) run by the interpreter."""
    interpreted_autotune(sys.modules["slimexport.kernels.lowrank_linear"])
    for shape in [(70, 40, 24, 150, True), (20, 16, 200, 24, False)]:  # rank 200 pads to 256 (pruned configs)
        x, u, v, b = make(*shape, torch.float32, "cpu")
        for _ in range(2):  # autotune, then the remembered config launched directly
            check(lowrank_linear_triton(x, u, v, b), x, u, v, b)


# ---------------------------------------------------------------------------------------------------- GPU


SD14_SHAPES = [  # M (UNet batch 4 × tokens), K, r, N: proj_in / proj_out at each width
    (4 * 4096, 320, 64, 320),
    (4 * 4096, 320, 160, 320),
    (4 * 1024, 640, 128, 640),
    (4 * 256, 1280, 256, 1280),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SD14_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sd14_shapes_on_gpu(cuda, dtype, shape):
    x, u, v, b = make(*shape, True, dtype, cuda)
    check(lowrank_linear_triton(x, u, v, b), x, u, v, b)


@pytest.mark.gpu
def test_auto_dispatch_on_gpu(cuda):
    x, u, v, b = make(4 * 4096, 320, 96, 320, True, torch.float16, cuda)
    check(lowrank_linear(x.reshape(4, 4096, 320), u, v, b).reshape(-1, 320), x, u, v, b)
