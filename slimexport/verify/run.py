"""The ``verify`` stage: the three parity comparisons of a build's engines (``build`` and ``verify DIR`` alike)."""

from __future__ import annotations

import logging

from slimexport.artifacts import sha256_json
from slimexport.config import MAX_VERIFY_PROMPTS
from slimexport.errors import SettingError
from slimexport.verify import parity

log = logging.getLogger("slimexport")


def run_verify(cfg, bundle, models: dict, engines: dict, profile, dense_memo: dict | None = None) -> dict:
    """The three parity comparisons on fixed inputs at the profile's optimal latent size.

    Args:
        cfg: the ``BuildConfig`` (``cfg.verify``: prompts, timesteps, gates).
        bundle: the loaded model (text encoder, scheduler, sizes).
        models: ``{"dense", "slim"}`` torch UNets, fp32 on the CPU; engines: the same pair as engines.
        profile: the engines' ``EngineProfile``.
        dense_memo: a dict kept by a caller that verifies many slim UNets against one dense UNet and engine (a
            sweep): the dense side's results (its export parity, ε, trajectory) are computed into it once, keyed
            by the verify settings, and reused.

    Returns:
        ``{"dense_export", "slim_export", "slim_vs_dense"}``: each comparison's metrics and verdict.
    """
    hw = (profile.opt_height, profile.opt_width)
    vcfg = cfg.verify  # 2 × num_prompts rows (CFG): kept inside the engines' batch range
    n = max(1, min(max(vcfg.num_prompts, -(-profile.min_batch // 2)), profile.max_batch // 2))
    if n > MAX_VERIFY_PROMPTS:
        raise SettingError(f"the engine profile takes at least {profile.min_batch} rows, more than verify's "
                           f"{2 * MAX_VERIFY_PROMPTS} (2 × {MAX_VERIFY_PROMPTS} prompts)", "lower the minimum of BuildConfig.batch")
    if n != vcfg.num_prompts:
        log.info("verify: %d prompt(s) instead of %d, to fit the engine profile (batch %d..%d rows, two per prompt)",
                 n, vcfg.num_prompts, profile.min_batch, profile.max_batch)
        vcfg = vcfg.replace(num_prompts=n)
    inputs = parity.fixed_inputs(bundle, vcfg, hw)
    # the engines' precision: the export's, or bf16 where an fp32 graph runs in bf16 (OpenVINO)
    dtype = "bf16" if cfg.export.dtype == "bf16" else engines["dense"].io_spec["inputs"][0]["dtype"].replace("float", "fp")
    tol = parity.export_tolerance(dtype, vcfg)
    memo = {} if dense_memo is None else dense_memo.setdefault(sha256_json([vcfg.to_dict(), list(hw), dtype]), {})
    if "export" not in memo:
        memo["export"] = parity.engine_vs_torch(engines["dense"], models["dense"], inputs, tol)
    return {"dense_export": memo["export"],
            "slim_export": parity.engine_vs_torch(engines["slim"], models["slim"], inputs, tol),
            "slim_vs_dense": parity.slim_vs_dense(models["dense"], models["slim"], bundle, inputs, vcfg, hw, dense_memo=memo)}
