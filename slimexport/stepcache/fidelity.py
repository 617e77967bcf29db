"""Trajectory fidelity of cached sampling: the gate between a cached pipeline and the dense uncached one.

The same fixed-seed sampler as the slim-vs-dense verification (:func:`slimexport.calibrate.runner.denoise`, seeds
``seed + i`` per prompt, CFG) runs the dense UNet uncached and the cached model (a :class:`CachedUNet`, a
:class:`~slimexport.stepcache.export.CachedEngineUNet`, or any UNet-like callable: cached + slim included); the
final latents are compared by cosine and relative L2 (``final-sample error``). The gate is the cosine, as for
slim UNets (README: ≥ 0.8 on a 10-step trajectory by default), plus finiteness.
"""

from __future__ import annotations

import math

import torch

from slimexport.calibrate.runner import denoise, initial_latents
from slimexport.verify.metrics import relative_l2

MIN_LATENT_COSINE = 0.8  # the slim-vs-dense trajectory gate's default (README, "Parity gates")


@torch.no_grad()
def cached_vs_dense(bundle, dense, cached, prompts: list[str], *, steps: int = 10, guidance: float = 7.5, seed: int = 0,
                    latent_hw: tuple[int, int] | None = None, min_cosine: float = MIN_LATENT_COSINE) -> dict:
    """Final latents of ``cached`` against the dense uncached UNet on the same seeded trajectories.

    Args:
        dense: the reference ``UNet2DConditionModel`` (uncached).
        cached: the model under test, called as a UNet by the sampler (reset first when it has ``reset``).
        prompts: one trajectory per prompt (seed ``seed + i``).
        latent_hw: latent size (default the bundle's).

    Returns:
        ``{"steps", "pattern", "final_cosine", "final_rel_l2", "max_abs", "passed", "reason", "gate"}``.
    """
    h, w = latent_hw or bundle.latent_size()
    cond = bundle.encoder.encode(list(prompts))[0].float()
    uncond = bundle.encoder.encode([""] * len(prompts))[0].float()
    finals = []
    for model in (dense, cached):
        if hasattr(model, "reset"):
            model.reset()
        sched = bundle.make_scheduler()
        lat = initial_latents([seed + i for i in range(len(prompts))], (int(dense.config.in_channels), h, w), "cpu",
                              torch.float32, sched.init_noise_sigma)
        finals.append(denoise(model, sched, cond, uncond, lat, steps, guidance).double().cpu())
    ref, got = finals
    finite = bool(torch.isfinite(got).all())
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)) if finite else math.nan
    passed = finite and cos >= min_cosine
    reason = None if passed else ("NaN/Inf in the cached model's final latents" if not finite
                                  else f"final-latent cosine {cos:.4f} < {min_cosine:g}")
    return {"steps": steps, "pattern": getattr(cached, "history", None), "final_cosine": cos,
            "final_rel_l2": relative_l2(got, ref), "max_abs": float((got - ref).abs().max()), "passed": passed,
            "reason": reason, "gate": {"min_latent_cosine": min_cosine}}
