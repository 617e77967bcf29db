"""The collector and the slim attention processor go through the kernel dispatch; on the CPU it picks TORCH."""

import torch

from slimexport.calibrate.collector import addmm_accumulate, kernel_accumulate
from slimexport.kernels import KernelImpl, choose_impl


def test_collector_accumulate_dispatches_to_reference_on_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 12, generator=g)
    a, b = torch.zeros(12, 12), torch.zeros(12, 12)
    kernel_accumulate(a, x)
    addmm_accumulate(b, x)
    assert torch.equal(a, b)
    assert choose_impl("cov_accumulate", torch.zeros(12, 12), x, impl=KernelImpl.AUTO) == KernelImpl.TORCH


def test_slim_processor_calls_the_dispatched_kernel_and_matches_sdpa(slim_tiny, tiny_inputs, monkeypatch):
    import slimexport.kernels as kernels
    from slimexport.slim.apply import install_processors

    unet, _ = slim_tiny
    x, ctx, _ = tiny_inputs
    t = torch.full((4,), 300.0)
    calls = []
    real = kernels.decoupled_attention

    def spy(q, k, v, scale, impl=KernelImpl.AUTO):
        calls.append((q.shape[-1], v.shape[-1]))
        return real(q, k, v, scale, impl=impl)

    monkeypatch.setattr(kernels, "decoupled_attention", spy)
    try:
        install_processors(unet)  # kernel="auto": the dispatching op
        with_kernel = unet(x, t, ctx).sample
        assert calls and any(rq != rv for rq, rv in calls)
        install_processors(unet, kernel=None)  # plain SDPA
        assert torch.allclose(with_kernel, unet(x, t, ctx).sample, atol=1e-6)
    finally:
        install_processors(unet)
