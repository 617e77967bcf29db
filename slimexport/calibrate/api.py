"""Stages A–B: pick the SlimSet, run the sampler with the collector, return :class:`CalibStats`."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from slimexport.artifacts import load_tensors, save_tensors, sha256_json
from slimexport.calibrate import slimset
from slimexport.calibrate.collector import StatsCollector, kernel_accumulate
from slimexport.calibrate.prompts import read_prompts_file, shipped_pool
from slimexport.calibrate.runner import denoise, initial_latents
from slimexport.calibrate.stats import CalibStats
from slimexport.config import CalibConfig
from slimexport.distributed import broadcast, dist_info
from slimexport.errors import ArtifactError, ResourceError, SlimExportError, UsageError
from slimexport.models.bundle import ModelBundle, converted_copy
from slimexport.models.kinds import find_units

log = logging.getLogger(__name__)
ENCODE_BATCH = 64


def embed_prompts(bundle: ModelBundle, prompts: list[str], device: str | torch.device | None = None) -> torch.Tensor:
    """Pooled text embeddings ``[N, P]`` (fp32, CPU, in the order of ``prompts``) for SlimSet selection.

    Batches hold prompts of similar length (``PromptEncoder.pooled`` pads a batch to its longest prompt only);
    ``device``: where the encoder runs (a copy; ``None``: where the bundle has it)."""
    if not prompts:
        return torch.empty(0, 0)
    encoder = bundle.encoder if device is None else bundle.encoder.on_device(device)
    order = torch.tensor(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    emb = torch.cat([encoder.pooled([prompts[i] for i in order[s:s + ENCODE_BATCH].tolist()]).float().cpu()
                     for s in range(0, len(order), ENCODE_BATCH)])
    return emb[torch.argsort(order)]  # back to the callers' order


EMBED_FORMAT = "slimexport.embed/1"


def cached_embeddings(bundle: ModelBundle, prompts: list[str], device: str | torch.device | None,
                      cache_dir: str | Path | None) -> torch.Tensor:
    """:func:`embed_prompts`, kept in ``cache_dir`` keyed by the text encoder's fingerprint, the prompts' content and
    the device type: a new calibration of the same model pays for its own prompts only, not the pool's embedding.

    An unreadable cached file is embedded again; a cache that cannot be written is only logged."""
    if cache_dir is None:
        return embed_prompts(bundle, prompts, device)
    dev = torch.device(device).type if device is not None else "bundle"
    key = sha256_json([EMBED_FORMAT, bundle.encoder_identity(), sha256_json(prompts), dev])
    path = Path(cache_dir) / f"{key[:32]}.safetensors"
    if path.is_file():
        try:
            emb = load_tensors(path, what="cached prompt embeddings")["pooled"]
            if emb.shape[0] == len(prompts):
                log.info("prompt pool embeddings reused from %s", path)
                return emb
        except (ArtifactError, KeyError) as err:
            log.warning("cached prompt embeddings %s are unusable (%s); embedding again", path, err)
    emb = embed_prompts(bundle, prompts, device)
    try:
        save_tensors(path, {"pooled": emb}, metadata={"format": EMBED_FORMAT})
    except (OSError, SlimExportError) as err:  # the cache is optional
        log.warning("could not cache prompt embeddings in %s (%s)", cache_dir, err)
    return emb


def select_prompts(bundle: ModelBundle, cfg: CalibConfig, device: str | torch.device | None = None,
                   cache_dir: str | Path | None = None) -> list[str]:
    """SlimSet: ``cfg.num_prompts`` prompts from ``cfg.prompts_file``, the model's own pool, or the shipped pool.

    ``device``: where the pool is embedded (``None``: where the bundle's encoder is). ``cache_dir``: where the
    pool's embeddings are kept between runs (:func:`cached_embeddings`; ``None``: not kept). Under
    ``torch.distributed`` rank 0's selection is used by every rank (embeddings on different devices may differ in
    the last bits)."""
    rank, _ = dist_info()
    return broadcast(_select(bundle, cfg, device, cache_dir) if rank == 0 else None)


def _select(bundle: ModelBundle, cfg: CalibConfig, device, cache_dir=None) -> list[str]:
    if cfg.prompts_file:
        pool, tags = read_prompts_file(cfg.prompts_file), None
    elif bundle.prompt_pool is not None:
        pool, tags = list(bundle.prompt_pool), None
    else:
        pool, tags = shipped_pool()
    if cfg.num_prompts >= len(pool):
        if cfg.num_prompts > len(pool):
            log.warning("asked for %d calibration prompts, the pool has %d: using all of them", cfg.num_prompts, len(pool))
        return pool
    emb = cached_embeddings(bundle, pool, device, cache_dir)
    idx = slimset.select_grouped(emb, tags, cfg.num_prompts) if tags else slimset.select(emb, cfg.num_prompts)
    return [pool[i] for i in idx]


def check_steps(bundle: ModelBundle, num_steps: int) -> None:
    """Refuse, before any work, a step count whose sampler timesteps leave the model's training range (DDIM with
    ``steps_offset=1`` and 1000 steps reaches t=1000, which the scheduler then indexes past its end)."""
    sched = bundle.make_scheduler()
    sched.set_timesteps(num_steps)
    top, n = int(sched.timesteps.max()), int(sched.config.num_train_timesteps)
    if top >= n:
        raise UsageError(f"--calib-steps {num_steps} gives sampler timestep {top}, outside the model's 0..{n - 1}",
                         f"use fewer steps (at most {n - 1}; the method's default is 25)")


def calibrate(bundle: ModelBundle, prompts: list[str], cfg: CalibConfig, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, progress: bool = True, accumulate=None) -> CalibStats:
    """Run the calibration sampler over ``prompts`` and collect statistics.

    Under ``torch.distributed`` each rank takes every ``world``-th prompt (seed = global index) and the
    statistics are all-reduced, so every rank returns the single-process result (up to float summation order).

    Args:
        bundle: the dense model (run as a copy on ``device`` in ``dtype``; the bundle is left as it is).
        prompts: the SlimSet (``select_prompts``).
        cfg: sampler and binning settings.
        device, dtype: where and in which precision the UNet runs; statistics are always fp32.
        accumulate: ``acc += xᵀx`` implementation; ``None`` uses the kernel dispatch (Triton on CUDA where faster).
    """
    device = torch.device(device)
    check_steps(bundle, cfg.num_steps)
    accumulate = accumulate or kernel_accumulate
    unet = converted_copy(bundle.unet, device, dtype)  # never round the caller's weights to fp16 in place
    units = find_units(unet)  # every unit of the kinds table; optional ones the model lacks are left out
    blocks, resnets, projs = units["block"], units["resnet"], units["proj"]
    rank, world = dist_info()
    mine = list(range(rank, len(prompts), world))
    h, w = bundle.latent_size(cfg.height, cfg.width)
    shape = (int(unet.config.in_channels), h, w)
    show = progress and rank == 0
    # The conditioning is encoded before the timed loop, by a copy of the text encoder on the UNet's device: the
    # loop's throughput is then the UNet's with the hooks, comparable to a plain sampling loop.
    t_enc = time.perf_counter()
    batches = [mine[s:s + cfg.batch_size] for s in range(0, len(mine), cfg.batch_size)]
    from tqdm.auto import tqdm

    encoder = bundle.encoder.on_device(device)
    pending = tqdm(batches, desc="encode prompts", unit="batch", dynamic_ncols=True, leave=False, disable=not show)
    conds = [encoder.encode([prompts[i] for i in idx])[0] for idx in pending]
    uncond_one = encoder.encode([""])[0].to(device=device, dtype=dtype) if cfg.use_cfg else None
    del encoder
    encode_seconds = time.perf_counter() - t_enc
    log.info("encoded %d calibration prompts in %.1f s", len(mine), encode_seconds)
    bar = tqdm(total=len(mine) * cfg.num_steps, desc="calibrate", unit="step", dynamic_ncols=True) if show else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    evals = 0
    collector = StatsCollector(unet, blocks, cfg.num_steps, cfg.num_bins, device, offload=cfg.offload, accumulate=accumulate,
                               resnets=resnets, projs=projs)
    try:
        with collector:
            for idx, cond in zip(batches, conds):
                cond = cond.to(device=device, dtype=dtype)
                uncond = uncond_one.expand(len(idx), -1, -1) if uncond_one is not None else None
                scheduler = bundle.make_scheduler()
                latents = initial_latents([cfg.seed + i for i in idx], shape, device, dtype, scheduler.init_noise_sigma)

                def on_step(i, _n=len(idx)):
                    collector.set_step(i)
                    if bar is not None and i > 0:
                        bar.update(_n)

                denoise(unet, scheduler, cond, uncond, latents, cfg.num_steps, cfg.guidance_scale, on_step=on_step)
                if bar is not None:
                    bar.update(len(idx))
                evals += len(idx) * cfg.num_steps * (2 if cfg.use_cfg else 1)
    except torch.cuda.OutOfMemoryError as err:
        raise ResourceError(
            f"CUDA ran out of memory during calibration (batch {cfg.batch_size}, {h * bundle.vae_scale_factor}x{w * bundle.vae_scale_factor})",
            "lower --calib-batch, add --calib-offload to keep finished timestep bins in CPU memory, or use --calib-dtype fp16",
        ) from err
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loop_seconds = time.perf_counter() - t0
    corr, counts, scalars = collector.finalize()
    seconds = time.perf_counter() - t0
    scheduler = bundle.make_scheduler()
    scheduler.set_timesteps(cfg.num_steps)
    meta = {
        "model": bundle.name, "source": bundle.source, "config": cfg.to_dict(), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "seconds": seconds, "world_size": world,
        "image_evals": len(prompts) * cfg.num_steps * (2 if cfg.use_cfg else 1),
        "loop_seconds": loop_seconds, "finalize_seconds": seconds - loop_seconds, "encode_seconds": encode_seconds,
        # throughput of the denoising loop with hooks; finalize (all-reduce, copy to host, NaN check) is a one-off
        "image_evals_per_s": world * evals / loop_seconds if loop_seconds > 0 else math.nan,
        "stats_bytes": sum(t.numel() * t.element_size() for t in corr.values()),
    }
    if device.type == "cuda":
        meta["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return CalibStats(blocks=blocks, corr=corr, counts=counts, scalars=scalars, timesteps=[int(t) for t in scheduler.timesteps],
                      num_bins=cfg.num_bins, prompts=list(prompts), meta=meta, resnets=resnets, projs=projs)
