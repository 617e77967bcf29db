"""Stage C: spectral influence scores, timestep weights and time-aggregated correlations (method §5).

For module m with input-side weight ``A_m`` (in × out; for a ResNet block, ``conv2`` with its kernel
taps as extra output columns) and input correlation ``C_{m,t}`` at step t:

    SIS[m,t] = n_m · tr(A_mᵀ C_{m,t} A_m) / (tr(C_{m,t}) · ‖A_m‖²_F)

a Rayleigh quotient of the trace-normalised correlation averaged over A's energy, blind to activation
scale; ``n_m`` (the input width) makes isotropic inputs score 1, so scores compare across module types. Both
traces are read per step from two scalars the collector sums: ``‖x A_m‖²`` (the layer's own output) and
``‖x‖²``. Then

    w[m,t] = SIS[m,t] / Σ_t' SIS[m,t']   (spectral; the ablation is uniform w = 1/T)
    C̄_m    = Σ_bins w[m,bin] · C_{m,bin} / tr(C_{m,bin})
    s_m    = Σ_t w[m,t] · SIS[m,t]       (× g_m, the relative output energy, with ``propagation``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimexport.calibrate.stats import CalibStats
from slimexport.errors import NumericalError
from slimexport.models.arch import BlockInfo, ProjInfo, ResnetInfo

# module kind → (statistic key of its input, scalar of its output energy for the propagation factor)
MODULE_INPUT = {"attn1.qk": "x", "attn1.vo": "x", "attn2.qk": "y", "attn2.vo": "e", "ff": "z", "resnet": "r",
                "proj_in": "pi", "proj_out": "po"}
MODULE_OUTPUT = {"attn1.qk": "out.attn1", "attn1.vo": "out.attn1", "attn2.qk": "out.attn2", "attn2.vo": "out.attn2",
                 "ff": "out.ff", "resnet": "resnet", "proj_in": "proj_in", "proj_out": "proj_out"}

Info = BlockInfo | ResnetInfo | ProjInfo


def input_width(block: Info, kind: str) -> int:
    if kind == "resnet":
        return block.inner
    if kind in ("proj_in", "proj_out"):
        return block.sizes(kind)[0]
    return {"x": block.width, "y": block.width, "e": block.context_dim, "z": block.ffn_width}[MODULE_INPUT[kind]]


@dataclass
class ModuleScore:
    """Timestep weighting of one module.

    Attributes:
        sis: ``[num_steps]`` spectral influence score per step.
        weights: ``[num_steps]`` timestep weights (sum to 1).
        bin_weights: ``[num_bins]`` weights summed per bin.
        score: ``s_m`` (with the propagation factor if enabled).
        propagation: ``g_m`` (1 when disabled).
    """

    sis: torch.Tensor
    weights: torch.Tensor
    bin_weights: torch.Tensor
    score: float
    propagation: float = 1.0


def sis_per_step(stats: CalibStats, block: Info, kind: str, weight_fro2: float) -> torch.Tensor:
    num = stats.scalars[f"{block.path}.{kind}"].double()
    den = stats.scalars[f"{block.path}.{MODULE_INPUT[kind]}"].double()
    if bool((den <= 0).any()):
        raise NumericalError(f"{block.path}.{kind} saw all-zero inputs at some step", "check the model and prompts")
    return input_width(block, kind) * num / (den * weight_fro2)


def module_score(stats: CalibStats, block: Info, kind: str, weight_fro2: float, weighting: str, propagation: bool) -> ModuleScore:
    """SIS, timestep weights and score of one module (``weight_fro2`` = ‖A_m‖²_F of its input-side weight)."""
    sis = sis_per_step(stats, block, kind, weight_fro2)
    t = sis.numel()
    w = sis / sis.sum() if weighting == "spectral" else torch.full_like(sis, 1.0 / t)
    bins = torch.zeros(stats.num_bins, dtype=torch.float64)
    bins.index_add_(0, torch.tensor(stats.step_bins()), w)
    score = float((w * sis).sum())
    g = 1.0
    if propagation:
        out = stats.scalars[f"{block.path}.{MODULE_OUTPUT[kind]}"].double().sum()
        res = stats.scalars[f"{block.path}.out.block_in"].double().sum()
        g = float((out / res).sqrt()) if float(res) > 0 else 1.0
        score *= g
    return ModuleScore(sis=sis, weights=w, bin_weights=bins, score=score, propagation=g)


def plan_weights(bin_weights: torch.Tensor) -> list[float]:
    """Timestep-bin weights as the plan records them (rounded to 6 decimals). The greedy allocation's error curves
    aggregate with these too, so that they and the decomposition factor the very same matrices."""
    return [round(float(x), 6) for x in bin_weights]


def aggregate(stats: CalibStats, block: Info, key: str, bin_weights: torch.Tensor | None) -> torch.Tensor:
    """Time-aggregated, trace-normalised correlation ``C̄`` (fp64) of ``<block>.<key>``."""
    c = stats.corr[f"{block.path}.{key}"].double()
    if c.dim() == 2:
        tr = torch.trace(c)
        if float(tr) <= 0:
            raise NumericalError(f"{block.path}: empty statistics for '{key}'", "recalibrate with more prompts")
        return c / tr
    tr = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)
    used = bin_weights > 0
    if bool((tr[used] <= 0).any()):
        b = int(((tr <= 0) & used).nonzero()[0, 0])
        raise NumericalError(f"{block.path}: empty statistics for '{key}' at timestep bin {b}", "recalibrate with more steps")
    w = torch.where(used, bin_weights / tr.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(tr))
    return torch.einsum("b,bij->ij", w, c)
