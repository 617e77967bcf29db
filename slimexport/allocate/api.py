"""Stage E: module scores and costs → a rank plan under the budget.

The plan is a plain JSON-able dict (``RankPlan``): ranks per module, per-module diagnostics, and parameter
counts of the targeted modules and of the whole UNet before and after.
"""

from __future__ import annotations

import math

from slimexport.allocate.budget import (
    ModuleCost,
    allocate_greedy,
    allocate_ranks,
    max_step_cost,
    softmax_weights,
)
from slimexport.allocate.scores import module_score, plan_weights
from slimexport.calibrate.stats import CalibStats
from slimexport.config import AllocConfig, DecomposeConfig
from slimexport.models.arch import (
    ATTN_KINDS,
    FFN_KIND,
    PROJ_KINDS,
    RESNET_KIND,
    BlockInfo,
    ProjInfo,
    ResnetInfo,
)

# Rank steps at SD size (method §7, export conventions §10): 8 per head keeps flash/SDPA kernels on their fast
# path; 64 FFN channels keep GEMM widths tensor-core friendly. Tiny models scale both down.
SD_ATTN_QUANTUM = 8
SD_FFN_QUANTUM = 64
SD_HEAD_DIM = 40
SD_FFN_WIDTH = 1024


def attn_quantum(head_dim: int, cfg: AllocConfig) -> int:
    if cfg.attn_quantum is not None:
        return min(cfg.attn_quantum, head_dim)
    return SD_ATTN_QUANTUM if head_dim >= SD_HEAD_DIM else max(2, head_dim // 8)


def ffn_quantum(width: int, cfg: AllocConfig) -> int:
    if cfg.ffn_quantum is not None:
        return min(cfg.ffn_quantum, width)
    return SD_FFN_QUANTUM if width >= SD_FFN_WIDTH else max(4, width // 32)


# ResNet inner widths are cut in whole GroupNorm groups; at SD size a step is the fewest groups whose channel
# count is a multiple of 16 (tensor-core alignment: widths off multiples of 16 lose the speed-up).
SD_RESNET_ALIGN = 16
SD_RESNET_MIN_INNER = 320


def resnet_quantum(r: ResnetInfo) -> int:
    """Rank step in groups."""
    if r.inner < SD_RESNET_MIN_INNER:
        return 1
    return math.lcm(r.group_size, SD_RESNET_ALIGN) // r.group_size


# Factored projections: ranks in steps of 32 at SD size (tensor-core friendly GEMM widths, 5 levels for 320
# channels), scaled down for tiny models.
SD_PROJ_QUANTUM = 32
SD_PROJ_MIN_RANK = 160


def proj_quantum(max_rank: int) -> int:
    return SD_PROJ_QUANTUM if max_rank >= SD_PROJ_MIN_RANK else max(2, max_rank // 8)


def proj_break_even(p: ProjInfo, kind: str) -> int:
    """The rank at which the factor pair costs what the dense layer does: ``⌊in·out / (in + out)⌋``.

    It is the projection's ``max_rank``: at this rank the layer is kept dense (no factors, no error)."""
    n_in, n_out = p.sizes(kind)
    return n_in * n_out // (n_in + n_out)


def unit_cost(block: BlockInfo | ResnetInfo | ProjInfo, kind: str) -> int:
    """Parameters per unit of rank: per-head rank for attention (all H heads), one channel for the FFN, one
    GroupNorm group for a ResNet block (conv1 rows + bias, time_emb_proj rows + bias, norm2 affine, conv2 columns)."""
    if kind == RESNET_KIND:
        per_channel = block.in_channels * block.kernel1 + 1 + (block.temb_dim + 1 if block.temb_dim else 0) + 2
        per_channel += block.out_channels * block.kernel2
        return block.group_size * per_channel
    if kind in PROJ_KINDS:
        return sum(block.sizes(kind))  # one column of U and one row of V
    h, c = block.num_heads, block.width
    if kind == "attn1.qk" or kind == "attn1.vo":
        return h * (c + c)
    if kind == "attn2.qk":
        return h * (c + block.context_dim)
    if kind == "attn2.vo":
        return h * (block.context_dim + c)
    return 2 * (c + 1) + c  # GEGLU content + gate rows (with biases) + one down-projection column


def unit_macs(block: BlockInfo | ResnetInfo | ProjInfo, kind: str, tokens: int, seq_len: int = 77) -> int:
    """MACs per unit of rank in one forward at batch 1: projections plus, for attention, the score (QK) or
    probability-times-value (VO) products, which shrink with the per-head rank too."""
    if kind == RESNET_KIND:
        per_channel = tokens * (block.in_channels * block.kernel1 + block.out_channels * block.kernel2) + block.temb_dim
        return block.group_size * per_channel  # conv1 rows, conv2 columns, time_emb_proj rows (one token)
    if kind in PROJ_KINDS:
        return tokens * sum(block.sizes(kind))
    h, c, n = block.num_heads, block.width, tokens
    if kind in ("attn1.qk", "attn1.vo"):
        return h * n * (2 * c + n)
    if kind in ("attn2.qk", "attn2.vo"):
        return h * (n * c + seq_len * block.context_dim + n * seq_len)
    return 3 * n * c  # GEGLU content + gate columns, one down-projection row, per token


def max_rank(block: BlockInfo | ResnetInfo | ProjInfo, kind: str) -> int:
    if kind == RESNET_KIND:
        return block.groups
    if kind in PROJ_KINDS:
        return proj_break_even(block, kind)
    return block.ffn_width if kind == FFN_KIND else block.head_dim


def input_weight(unet, block: BlockInfo | ResnetInfo | ProjInfo, kind: str):
    """``A_m`` of the spectral influence score, as the torch weight ``Aᵀ``."""
    b = unet.get_submodule(block.path)
    if kind == RESNET_KIND:
        return b.conv2.weight
    if kind in PROJ_KINDS:
        return getattr(b, kind).weight
    return {"attn1.qk": b.attn1.to_q, "attn1.vo": b.attn1.to_v, "attn2.qk": b.attn2.to_q,
            "attn2.vo": b.attn2.to_v, "ff": b.ff.net[2]}[kind].weight


def targeted_kinds(cfg: AllocConfig) -> tuple[str, ...]:
    return ((ATTN_KINDS if "attn" in cfg.targets else ()) + ((FFN_KIND,) if "ffn" in cfg.targets else ())
            + ((RESNET_KIND,) if "resnet" in cfg.targets else ()) + (PROJ_KINDS if "proj" in cfg.targets else ()))


def targeted_budget(acfg: AllocConfig, targeted_dense: int, unet_dense: int) -> float:
    """The budget as a fraction of the targeted cost (``scope=unet`` puts the whole cut on the targets).

    Costs are parameters or, with ``metric=macs``, MACs of one forward at the calibration size."""
    if acfg.scope == "targeted":
        return acfg.budget
    fixed = unet_dense - targeted_dense
    b = (acfg.budget * unet_dense - fixed) / targeted_dense
    if b <= 0:
        from slimexport.errors import UsageError

        raise UsageError(
            f"a whole-UNet budget of {acfg.budget:g} needs more than all targeted {acfg.metric} ({', '.join(acfg.targets)}: "
            f"{targeted_dense / unet_dense:.1%} of the UNet)",
            f"use --budget above {fixed / unet_dense:.3f} or add targets (e.g. --targets attn,ffn,resnet)",
        )
    return b


def score_modules(unet, stats: CalibStats, dcfg: DecomposeConfig, acfg: AllocConfig) -> dict[str, dict]:
    """Per targeted module: kind, block, score, timestep weights (method §5)."""
    out = {}
    units = [(b, k) for b in stats.blocks for k in targeted_kinds(acfg) if k in ATTN_KINDS or k == FFN_KIND]
    if RESNET_KIND in acfg.targets:
        if not stats.resnets:
            from slimexport.errors import UsageError

            raise UsageError("--targets includes resnet but the calibration statistics hold no ResNet blocks",
                             "recalibrate with this slimexport version (delete the calib/ folder)")
        units += [(r, RESNET_KIND) for r in stats.resnets]
    if "proj" in acfg.targets:
        if not stats.projs:
            from slimexport.errors import UsageError
            from slimexport.models.arch import projections

            try:
                has = bool(projections(unet))
            except UsageError as err:
                raise UsageError(f"--targets includes proj but this model's projections cannot be factored ({err.message})",
                                 "drop 'proj' from --targets") from err
            if not has:
                raise UsageError("--targets includes proj but the model has no transformer proj_in/proj_out layers",
                                 "drop 'proj' from --targets")
            raise UsageError("--targets includes proj but the calibration statistics hold no transformer projections",
                             "recalibrate with this slimexport version (delete the calib/ folder)")
        units += [(t, k) for t in stats.projs for k in PROJ_KINDS]
    for block, kind in units:
        w = input_weight(unet, block, kind).detach().double()
        ms = module_score(stats, block, kind, float((w**2).sum()), dcfg.timestep_weighting, acfg.propagation)
        out[f"{block.path}.{kind}"] = {"block": block, "kind": kind, "ms": ms}
    return out


def plan_ranks(unet, stats: CalibStats, dcfg: DecomposeConfig, acfg: AllocConfig,
               latent_hw: tuple[int, int] | None = None, factors=None) -> dict:
    """The rank plan: ``{"ranks": {module: rank}, "modules": {...}, "params": {...}, ...}``.

    ``latent_hw`` (default: the UNet's sample size) sets the token counts of the ``macs`` metric. ``factors``
    (a :class:`~slimexport.decompose.api.Factorisations`): where the greedy allocation's error curves leave
    their factorisations for the decomposition.
    """
    greedy = acfg.method == "greedy"
    if greedy and (dcfg.qkvo_method != "whiten" or dcfg.ffn_selection not in ("cpqr", "leverage")):
        from slimexport.errors import UsageError

        raise UsageError("--allocation greedy reads the whitened decompositions' error curves",
                         "use it with --qkvo-method whiten and --ffn-selection cpqr or leverage")
    scored = score_modules(unet, stats, dcfg, acfg.replace(propagation=True) if greedy else acfg)
    tokens = None
    if acfg.metric == "macs":
        from slimexport.models.macs import count_macs, token_counts

        hw = latent_hw or (None, None)
        tokens = token_counts(unet, *hw)
        unet_macs = count_macs(unet, 1, *hw)["total"]
    modules, param_cost = [], {}
    for name, s in scored.items():
        block, kind = s["block"], s["kind"]
        d = max_rank(block, kind)
        if kind == RESNET_KIND:
            q = resnet_quantum(block)
            r_min = min(q, d)
        elif kind in PROJ_KINDS:
            q = proj_quantum(d)
            r_min = min(q, d)
        else:
            q = ffn_quantum(d, acfg) if kind == FFN_KIND else attn_quantum(d, acfg)
            r_min = min(acfg.r_min, d)
        param_cost[name] = unit_cost(block, kind)
        cost = param_cost[name] if tokens is None else unit_macs(block, kind, tokens[block.path])
        modules.append(ModuleCost(name=name, kind=kind, max_rank=d, unit_cost=cost, r_min=r_min, quantum=q, score=s["ms"].score))
    temperature = math.inf if acfg.method == "uniform" else acfg.temperature
    targeted_cost = sum(m.dense_params for m in modules)
    unet_dense = sum(p.numel() for p in unet.parameters())
    budget = targeted_budget(acfg, targeted_cost, unet_dense if tokens is None else unet_macs)
    curves, weights = {}, {}
    if greedy:
        from slimexport.decompose.curves import module_curves

        curves = module_curves(unet, stats, scored, dcfg, factors=factors)
        weights = {n: s["ms"].propagation ** 2 for n, s in scored.items()}  # output energy / residual-stream energy
        ranks = allocate_greedy(modules, budget, curves, weights)
        temperature = math.inf  # pi below: uniform, unused
    else:
        ranks = allocate_ranks(modules, budget, temperature)
    pi = softmax_weights([m.score for m in modules], temperature)
    targeted_dense = sum(m.max_rank * param_cost[m.name] for m in modules)
    targeted_slim = sum(ranks[m.name] * param_cost[m.name] for m in modules)
    return {
        "budget": acfg.budget,
        "scope": acfg.scope,
        "metric": acfg.metric,
        "targeted_budget": budget,
        "targets": list(acfg.targets),
        "ranks": ranks,
        "modules": {
            m.name: {"kind": m.kind, "rank": ranks[m.name], "max_rank": m.max_rank, "keep": ranks[m.name] / m.max_rank,
                     "unit_cost": param_cost[m.name], "alloc_cost": m.unit_cost, "quantum": m.quantum, "r_min": m.r_min, "score": m.score, "softmax": p,
                     "timestep_weights": plan_weights(scored[m.name]["ms"].bin_weights),
                     **({"rel_error": float(curves[m.name][ranks[m.name]]), "weight": weights[m.name]} if greedy else {})}
            for m, p in zip(modules, pi)
        },
        "params": {
            "targeted_dense": targeted_dense, "targeted_slim": targeted_slim,
            "target": budget * targeted_dense if tokens is None else None, "max_step": max_step_cost(modules) if tokens is None else None,
            "dense_total": unet_dense, "slim_total": unet_dense - targeted_dense + targeted_slim,
        },
        "allocation": {"method": acfg.method, "metric": acfg.metric, "targeted_budget": budget, "target": budget * targeted_cost,
                       "kept": sum(ranks[m.name] * m.unit_cost for m in modules), "max_step": max_step_cost(modules)},
    }
