"""The sampler: the model's own DDIM scheduler with classifier-free guidance (stage B's driver, hooks attached).

Both CFG branches run in one UNet batch (``[uncond; cond]``), as at inference, and both feed the statistics.
The loop is the one ``StableDiffusionPipeline`` runs (scale input → UNet → guidance → scheduler step); calibration
starts it from latents of per-prompt seeded generators (:func:`initial_latents`), so that a prompt's trajectory
does not depend on its batch.

It is the package's one sampling loop: calibration, verification's trajectory
(:func:`slimexport.verify.parity.slim_vs_dense`, :func:`slimexport.verify.quality.sample_trajectory`), the quality
harness and the device check all run :func:`denoise`; they differ only in how they seed the starting latents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def initial_latents(seeds: list[int], shape: tuple[int, int, int], device, dtype, sigma: float) -> torch.Tensor:
    """``[B, C, h, w]`` standard normal latents, prompt ``i`` from ``torch.Generator().manual_seed(seeds[i])``."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return (torch.stack(out) * sigma).to(device=device, dtype=dtype)


@torch.no_grad()
def denoise(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor | None, latents: torch.Tensor, num_steps: int,
            guidance_scale: float, on_step: Callable[[int], None] | None = None,
            on_eps: Callable[[int, torch.Tensor], None] | None = None,
            on_latents: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run ``num_steps`` DDIM steps from ``latents``; returns the final latents.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (dense or slim).
        scheduler: a fresh scheduler (``set_timesteps`` is called here).
        cond: ``[B, L, D]`` conditioning; ``uncond``: ``[B, L, D]`` unconditional conditioning or ``None`` (no CFG).
        on_step: called with the step index before each UNet call (the collector's ``set_step``).
        on_eps: called with (step, guided ε) after each UNet call.
        on_latents: called with (step, latents) after each scheduler step.
    """
    scheduler.set_timesteps(num_steps)
    use_cfg = uncond is not None and guidance_scale > 1.0
    context = torch.cat([uncond, cond]) if use_cfg else cond
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i)
        x = torch.cat([latents, latents]) if use_cfg else latents
        x = scheduler.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        eps = unet(x, tt, encoder_hidden_states=context, return_dict=False)[0]
        if use_cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        if on_eps is not None:
            on_eps(i, eps)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        if on_latents is not None:
            on_latents(i, latents)
    return latents
