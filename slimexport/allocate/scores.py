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

from slimexport.calibrate.stats import CalibStats, aggregate  # noqa: F401 - aggregate: C̄ of the docstring
from slimexport.errors import NumericalError
from slimexport.models.kinds import BLOCK_IN, KINDS, Info
from slimexport.plan import plan_weights  # noqa: F401 - the plan's rounding of the bin weights


def input_width(block: Info, kind: str) -> int:
    return KINDS[kind].input_width(block)


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
    den = stats.scalars[f"{block.path}.{KINDS[kind].input_stat}"].double()
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
        out = stats.scalars[f"{block.path}.{KINDS[kind].output_energy}"].double().sum()
        res = stats.scalars[f"{block.path}.{BLOCK_IN}"].double().sum()
        g = float((out / res).sqrt()) if float(res) > 0 else 1.0
        score *= g
    return ModuleScore(sis=sis, weights=w, bin_weights=bins, score=score, propagation=g)
