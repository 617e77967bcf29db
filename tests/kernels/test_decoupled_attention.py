"""decoupled_attention: the Triton twin against ``F.scaled_dot_product_attention(q, k, v, scale=scale)``."""

import sys

import pytest
import torch

from slimexport.errors import UsageError
from slimexport.kernels.decoupled_attention import (
    decoupled_attention,
    decoupled_attention_ref,
    decoupled_attention_triton,
)

# Per input dtype: (rtol, atol) against the fp32 reference on the same (rounded) inputs. 16-bit inputs round the
# probabilities to the input dtype before the P·V product (as every flash kernel does) and the output once.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def make(B, H, N, S, r_qk, r_vo, dtype, device, seed=0, processor_layout=True):
    """q as the slim attention processor passes it (a transposed view of [B, N, H, r]), k and v contiguous."""
    g = torch.Generator().manual_seed(seed)
    if processor_layout:
        q = torch.randn(B, N, H, r_qk, generator=g).to(dtype).to(device).transpose(1, 2)
    else:
        q = torch.randn(B, H, N, r_qk, generator=g).to(dtype).to(device)
    k = torch.randn(B, H, S, r_qk, generator=g).to(dtype).to(device)
    v = torch.randn(B, H, S, r_vo, generator=g).to(dtype).to(device)
    return q, k, v


def check(out, q, k, v, scale):
    expected = decoupled_attention_ref(q.float(), k.float(), v.float(), scale)
    assert out.shape == expected.shape and out.dtype == q.dtype
    rtol, atol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), expected, rtol=rtol, atol=atol)


SHAPES = [  # B, H, N, S, r_qk, r_vo: odd token counts, ranks 8/24/40, r_vo != r_qk
    (1, 2, 37, 37, 24, 40),  # self-attention, N and S no multiple of the block
    (2, 1, 33, 77, 8, 16),  # cross-attention: 77 text tokens
    (1, 1, 20, 5, 40, 8),  # fewer keys than one block
    (1, 2, 16, 48, 32, 24),  # S a multiple of the block (the unmasked EVEN_S path)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(kernel_device, dtype, shape):
    B, H, N, S, r_qk, r_vo = shape
    q, k, v = make(*shape, dtype, kernel_device)
    scale = 80 ** -0.5  # the dense layer's head size, not r_qk
    check(decoupled_attention_triton(q, k, v, scale), q, k, v, scale)


def test_output_layout_makes_processor_reshape_free(kernel_device):
    q, k, v = make(2, 3, 21, 21, 16, 24, torch.float32, kernel_device)
    out = decoupled_attention_triton(q, k, v, 0.25)
    assert out.shape == (2, 3, 21, 24)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, r_vo] memory: reshape to [B, N, H*r_vo] is a view


def test_contiguous_inputs_and_large_logits(kernel_device):
    # Large logits: the running maximum keeps exp2 finite.
    q, k, v = make(1, 2, 19, 23, 24, 16, torch.float32, kernel_device, seed=3, processor_layout=False)
    out = decoupled_attention_triton(q * 30, k * 30, v, 1.0)
    assert torch.isfinite(out).all()
    check(out, q * 30, k * 30, v, 1.0)


def test_single_key_returns_its_value(kernel_device):
    q, k, v = make(1, 1, 9, 1, 8, 8, torch.float32, kernel_device, seed=4)
    out = decoupled_attention_triton(q, k, v, 0.3)
    torch.testing.assert_close(out, v.expand(1, 1, 9, 8))


@pytest.mark.parametrize("fn", [decoupled_attention_triton, decoupled_attention])
def test_bad_arguments_say_what(fn):
    q, k, v = make(1, 2, 4, 4, 8, 8, torch.float32, "cpu")
    with pytest.raises(UsageError, match="do not match"):
        fn(q, k[..., :4], v, 1.0)
    with pytest.raises(UsageError, match="4-D"):
        fn(q[0], k[0], v[0], 1.0)
    with pytest.raises(UsageError, match="dtype"):
        fn(q, k.half(), v, 1.0)


def test_triton_rejects_heads_wider_than_256(kernel_device):
    q, k, v = make(1, 1, 4, 4, 264, 8, torch.float32, kernel_device)
    with pytest.raises(UsageError, match="outside the kernel's range"):
        decoupled_attention_triton(q, k, v, 1.0)
    # AUTO and TORCH use the reference for it
    torch.testing.assert_close(decoupled_attention(q, k, v, 1.0), decoupled_attention_ref(q, k, v, 1.0))


def test_triton_needs_a_positive_scale(kernel_device):
    q, k, v = make(1, 1, 5, 5, 8, 8, torch.float32, kernel_device)
    with pytest.raises(UsageError, match="scale > 0"):
        decoupled_attention_triton(q, k, v, -0.5)
    torch.testing.assert_close(decoupled_attention(q, k, v, -0.5), decoupled_attention_ref(q, k, v, -0.5))


def test_dispatcher_on_cpu_is_the_reference():
    q, k, v = make(1, 2, 13, 7, 24, 40, torch.float32, "cpu")
    assert torch.equal(decoupled_attention(q, k, v, 0.1), decoupled_attention_ref(q, k, v, 0.1))


def test_usable_as_slim_processor_kernel(kernel_device):
    """``SlimAttnProcessor(scale, kernel=...)`` calls ``kernel(q, k, v, scale)``: same output as without it."""
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    from slimexport.slim.attention import SlimAttnProcessor

    torch.manual_seed(0)
    hidden = torch.randn(2, 19, 32, device=kernel_device)
    context = torch.randn(2, 11, 24, device=kernel_device)

    def triton_kernel(q, k, v, scale):
        return decoupled_attention(q, k, v, scale, impl="triton")

    for cross_dim, ctx in ((None, None), (24, context)):  # self- and cross-attention
        attn = attention_processor.Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=cross_dim)
        attn = attn.to(kernel_device).eval()
        with torch.no_grad():
            attn.set_processor(SlimAttnProcessor(16 ** -0.5))
            expected = attn(hidden, encoder_hidden_states=ctx)
            attn.set_processor(SlimAttnProcessor(16 ** -0.5, kernel=triton_kernel))
            torch.testing.assert_close(attn(hidden, encoder_hidden_states=ctx), expected, rtol=1e-5, atol=1e-5)


def test_autotuned_launch_path(interpreted_autotune):
    """The GPU launch path (autotune over the configs, prune, EVEN_S heuristic, grid) run by the interpreter."""
    interpreted_autotune(sys.modules["slimexport.kernels.decoupled_attention"])
    for shape in [(1, 2, 70, 77, 24, 40), (1, 1, 20, 64, 160, 8)]:  # masked S; 256-wide (pruned) heads, even S
        q, k, v = make(*shape, torch.float32, "cpu")
        for _ in range(2):  # autotune, then the remembered config launched directly
            check(decoupled_attention_triton(q, k, v, 0.1), q, k, v, 0.1)


# ---------------------------------------------------------------------------------------------------- GPU


SD14_SHAPES = [  # B (UNet batch 4), H, N, S, r_qk, r_vo
    (4, 8, 4096, 4096, 24, 32),  # self-attention, width 320 (d = 40)
    (4, 8, 4096, 4096, 40, 40),  # self-attention, width 320 at full rank
    (4, 8, 1024, 1024, 48, 64),  # self-attention, width 640 (d = 80)
    (4, 8, 4096, 77, 24, 32),  # cross-attention, width 320
    (4, 8, 256, 256, 160, 160),  # width 1280 at full rank (d = 160): 256-wide padded heads
    (4, 8, 256, 77, 120, 104),  # width 1280, cross
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SD14_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sd14_shapes_on_gpu(cuda, dtype, shape):
    q, k, v = make(*shape, dtype, cuda)
    scale = (8 * shape[4]) ** -0.5
    check(decoupled_attention_triton(q, k, v, scale), q, k, v, scale)


@pytest.mark.gpu
def test_auto_dispatch_on_gpu(cuda):
    q, k, v = make(2, 8, 1024, 1024, 24, 40, torch.float16, cuda)
    check(decoupled_attention(q, k, v, 0.15), q, k, v, 0.15)
    check(decoupled_attention(q, k, v, 0.15), q, k, v, 0.15)  # cached choice


def test_reference_pads_unequal_head_sizes_on_cpu_without_changing_the_result():
    """The CPU reference pads q/k or v to one head size (fused SDPA); the result is the plain softmax attention."""
    from slimexport.kernels.decoupled_attention import decoupled_attention_ref

    g = torch.Generator().manual_seed(5)
    for rq, rv in ((8, 24), (40, 16)):
        q, k = torch.randn(2, 3, 37, rq, generator=g), torch.randn(2, 3, 29, rq, generator=g)
        v = torch.randn(2, 3, 29, rv, generator=g)
        want = torch.softmax(q @ k.transpose(-1, -2) * 0.17, -1) @ v
        got = decoupled_attention_ref(q, k, v, 0.17)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_padding_is_traced_by_torch_export_but_not_by_jit_or_onnx():
    """torch.export (AOTInductor) keeps the CPU padding, so the compiled package runs the fused SDPA kernel; jit
    tracing (and ONNX export, which traces) keep the plain attention with the slim head sizes."""
    from slimexport.kernels.decoupled_attention import decoupled_attention_ref

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return decoupled_attention_ref(q, k, v, 0.17)

    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 29, 8, generator=g), torch.randn(2, 3, 29, 24, generator=g)
    ep = torch.export.export(Attn(), (q, k, v))
    exported = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("pad" in t for t in exported), exported
    assert torch.allclose(ep.module()(q, k, v), Attn()(q, k, v), atol=1e-6)
    traced = torch.jit.trace(Attn(), (q, k, v))
    assert "pad" not in str(traced.graph) and "scaled_dot_product_attention" in str(traced.graph)
