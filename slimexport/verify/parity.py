"""The three comparisons of ``slimexport verify``, on one set of fixed inputs.

Inputs: ``num_prompts`` prompts with their unconditional twins (CFG-shaped: batch ``2 × num_prompts``),
seeded Gaussian latents, at each of several timesteps. Comparisons:

- ``dense_export``: dense engine vs dense PyTorch (fp32): does the export/engine compute the model?
- ``slim_export``: slim engine vs slim PyTorch (fp32).
- ``slim_vs_dense``: slim vs dense PyTorch (compression fidelity): relative ε-prediction error
  ``‖ε_slim − ε_dense‖ / ‖ε_dense‖`` per timestep (:func:`~slimexport.verify.metrics.relative_l2`), and the final
  latents of a fixed-seed trajectory of the calibration sampler (:func:`~slimexport.calibrate.runner.denoise`,
  prompt ``i`` seeded with ``seed + i``).

Metric formulas are in :mod:`slimexport.verify.metrics`; each entry of the result carries ``max_abs``,
``max_rel``, ``p99_abs``, ``mean_abs``, ``cosine``, ``sqnr_db`` over all timesteps together and ``passed``.
"""

from __future__ import annotations

import numpy as np
import torch

from slimexport.config import VerifyConfig
from slimexport.verify.metrics import Tolerance, compare, relative_l2

DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a bowl of fruit on a wooden table, oil painting",
                   "a lighthouse in fog", "a crowded night market with neon signs")
METRIC_KEYS = ("max_abs", "max_rel", "p99_abs", "mean_abs", "cosine", "sqnr_db")
# Metrics only (no gate but NaN/Inf): slim-vs-dense is gated on ε error and trajectory cosine instead.
UNGATED = Tolerance(atol=0.0, rtol=0.0, min_cosine=-1.0, max_fail_fraction=1.0)


def fixed_prompts(bundle, n: int) -> list[str]:
    pool = list(bundle.prompt_pool) if bundle.prompt_pool else list(DEFAULT_PROMPTS)
    return [pool[(i * max(1, len(pool) // n)) % len(pool)] for i in range(n)]


def fixed_inputs(bundle, cfg: VerifyConfig, latent_hw: tuple[int, int]) -> list[dict[str, np.ndarray]]:
    """One feed dict (float32) per timestep: ``sample [2n, C, h, w]``, ``timestep [2n]``, ``encoder_hidden_states``."""
    prompts = fixed_prompts(bundle, cfg.num_prompts)
    with torch.no_grad():
        cond = bundle.encoder.encode(prompts)[0].float().cpu()
        uncond = bundle.encoder.encode([""] * len(prompts))[0].float().cpu()
    ctx = torch.cat([uncond, cond]).numpy()
    c = int(bundle.unet.config.in_channels)
    g = torch.Generator().manual_seed(cfg.seed)
    feeds = []
    for t in cfg.timesteps:
        sample = torch.randn(ctx.shape[0], c, *latent_hw, generator=g).numpy()
        feeds.append({"sample": sample, "timestep": np.full((ctx.shape[0],), t, np.float32), "encoder_hidden_states": ctx})
    return feeds


@torch.no_grad()
def torch_eps(unet, feeds: dict[str, np.ndarray]) -> np.ndarray:
    p = next(unet.parameters())
    out = unet(torch.from_numpy(feeds["sample"]).to(p.device, p.dtype), torch.from_numpy(feeds["timestep"]).to(p.device),
               torch.from_numpy(feeds["encoder_hidden_states"]).to(p.device, p.dtype), return_dict=False)[0]
    return out.float().cpu().numpy()


def _cast(feeds: dict[str, np.ndarray], io_spec: dict) -> dict[str, np.ndarray]:
    types = {e["name"]: e["dtype"] for e in io_spec["inputs"]}
    return {k: v.astype(types.get(k, v.dtype)) for k, v in feeds.items()}


def summarize(per_t: list[tuple[np.ndarray, np.ndarray]], tol: Tolerance) -> dict:
    """Metrics over all timesteps together (concatenated), plus the verdict."""
    a = np.concatenate([x.ravel() for x, _ in per_t])
    b = np.concatenate([y.ravel() for _, y in per_t])
    m = compare(a, b, tol)
    return {**{k: m.get(k) for k in METRIC_KEYS}, "passed": bool(m["passed"]), "failed": m["failed"], "reason": m["reason"],
            "nan_count": m.get("nan_count", 0), "inf_count": m.get("inf_count", 0), "numel": m["numel"], "tolerance": m["tolerance"]}


def export_tolerance(dtype: str, cfg: VerifyConfig) -> Tolerance:
    base = Tolerance.for_dtype(dtype)
    changes = {k: getattr(cfg, k) for k in ("atol", "rtol", "min_cosine") if getattr(cfg, k) is not None}
    if not changes:
        return base
    from dataclasses import replace

    return replace(base, **changes)


def engine_vs_torch(engine, unet, inputs: list[dict[str, np.ndarray]], tol: Tolerance) -> dict:
    """Engine output vs fp32 PyTorch on every fixed input."""
    out_name = engine.io_spec["outputs"][0]["name"]
    pairs = []
    for feeds in inputs:
        got = engine.run(_cast(feeds, engine.io_spec))[out_name]
        pairs.append((got.astype(np.float32), torch_eps(unet, feeds)))
    return summarize(pairs, tol)


# Default slim-vs-dense gates (flags override them). Trained weights: set from the spread of fidelity over budgets
# and methods on `digits`, with random column/subspace selection as the negative control that must fail
# (docs/results/cpu-gate-evidence-digits-2026-12-02.json, README "Gates"). Random weights (`tiny`,
# --random-weights): fidelity means little there (a random model has no low-rank structure: SlimDiff at 0.73 gives
# ε 0.08 on `tiny`, 0.13 on SD1.4 shapes), so only a broken model fails their loose gate.
TRAINED_GATE = {"max_eps_error": 0.03, "min_latent_cosine": 0.97}
RANDOM_WEIGHTS_GATE = {"max_eps_error": 0.5, "min_latent_cosine": 0.8}


def default_gate(cfg: VerifyConfig, bundle) -> tuple[VerifyConfig, str]:
    """``cfg`` with its unset gates filled in for ``bundle``, and what they rest on."""
    random = bundle.weights_random
    base = RANDOM_WEIGHTS_GATE if random else TRAINED_GATE
    filled = {k: v for k, v in base.items() if getattr(cfg, k) is None}
    basis = ("random weights: loose default" if random else "trained weights: measured default") if filled else "set"
    return cfg.replace(**filled), basis


def slim_vs_dense(dense, slim, bundle, inputs: list[dict[str, np.ndarray]], cfg: VerifyConfig, latent_hw,
                  dense_memo: dict | None = None) -> dict:
    """Compression fidelity: ε per timestep and the final latents of a fixed-seed trajectory, gated by ``cfg``'s
    thresholds or, where unset, :func:`default_gate`'s. ``dense_memo``: the dense UNet's ε and final latents for
    these inputs and settings, filled on first use and reused (one dense UNet against many slim ones)."""
    cfg, basis = default_gate(cfg, bundle)
    from slimexport.calibrate.runner import denoise, initial_latents

    memo = {} if dense_memo is None else dense_memo
    if "eps" not in memo:
        memo["eps"] = [torch_eps(dense, feeds) for feeds in inputs]
    pairs, per_t = [], {}
    for feeds, e_d in zip(inputs, memo["eps"], strict=True):
        e_s = torch_eps(slim, feeds)
        pairs.append((e_s, e_d))
        per_t[str(float(feeds["timestep"][0]))] = relative_l2(e_s, e_d)
    nan_free = all(np.isfinite(a).all() for a, _ in pairs)
    mean_err = float(np.mean(list(per_t.values())))
    res = summarize(pairs, UNGATED)  # gated below, on ε error
    prompts = fixed_prompts(bundle, cfg.num_prompts)
    with torch.no_grad():
        cond = bundle.encoder.encode(prompts)[0].float()
        uncond = bundle.encoder.encode([""] * len(prompts))[0].float()
    finals = []
    for unet in (dense, slim):
        if unet is dense and "final" in memo:
            finals.append(memo["final"])
            continue
        sched = bundle.make_scheduler()
        lat = initial_latents([cfg.seed + i for i in range(len(prompts))], (int(unet.config.in_channels), *latent_hw),
                              "cpu", torch.float32, sched.init_noise_sigma)
        p = next(unet.parameters())
        out = denoise(unet, sched, cond.to(p.device, p.dtype), uncond.to(p.device, p.dtype), lat.to(p.device, p.dtype),
                      cfg.trajectory_steps, cfg.guidance_scale)
        finals.append(out.float().cpu().numpy())
        if unet is dense:
            memo["final"] = finals[-1]
    traj = compare(finals[1], finals[0], UNGATED)
    traj_rel = relative_l2(finals[1], finals[0])
    failed, reasons = [], []
    if not nan_free or not np.isfinite(finals[1]).all():
        failed.append("finite")
        reasons.append("NaN/Inf in the slim model's outputs")
    if mean_err > cfg.max_eps_error:
        failed.append("eps_error")
        reasons.append(f"mean relative ε error {mean_err:.3g} > {cfg.max_eps_error:g}")
    if traj.get("cosine") is None or traj["cosine"] < cfg.min_latent_cosine:
        failed.append("latent_cosine")
        c = traj.get("cosine")  # None: no finite element to compare
        reasons.append(f"final-latent cosine {'n/a' if c is None else format(c, '.4f')} < {cfg.min_latent_cosine:g}")
    res.update(
        eps_rel_error=per_t, eps_rel_error_mean=mean_err,
        trajectory={"steps": cfg.trajectory_steps, "guidance_scale": cfg.guidance_scale, "rel_error": traj_rel,
                    **{k: traj.get(k) for k in METRIC_KEYS}},
        passed=not failed, failed=failed, reason="; ".join(reasons) or None,
        gate={"max_eps_error": cfg.max_eps_error, "min_latent_cosine": cfg.min_latent_cosine, "basis": basis},
    )
    res.pop("tolerance", None)
    return res
