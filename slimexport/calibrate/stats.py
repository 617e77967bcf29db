"""``CalibStats``: the calibration artifact (safetensors tensors + JSON metadata).

A new budget, temperature or decomposition reuses it: only calibration settings and the model key it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimexport._version import __version__
from slimexport.artifacts import atomic_dir, load_tensors, read_json, save_tensors, write_json
from slimexport.calibrate.collector import check_stats, step_to_bin
from slimexport.errors import ArtifactError, IncompatibleArtifactError, NumericalError
from slimexport.models.arch import BlockInfo, ProjInfo, ResnetInfo

STATS_FORMAT = "slimexport.calib/2"  # /2: transformer projection statistics (pi/po)
TENSORS = "stats.safetensors"
META = "stats.json"


@dataclass
class CalibStats:
    """Correlations and spectral-influence scalars of one calibration run.

    Attributes:
        blocks: the transformer blocks measured.
        corr: ``<block>.x|y|z`` → ``[num_bins, n, n]`` and ``<block>.e`` → ``[n, n]`` sums of ``xᵀx`` (fp32).
        counts: token counts per key (per bin for binned keys).
        scalars: per-step sums ``[num_steps]`` (fp64): ``<block>.<module>`` = ‖x A_m‖², ``<block>.x|y|e|z`` =
            ‖x‖² of the module's input, ``<block>.out.<sub>`` = output energy of attn1/attn2/ff and the block input.
        timesteps: scheduler timesteps of the steps, in order.
        num_bins: timestep bins.
        prompts: the calibration prompts.
        meta: provenance: model, calibration config, timings, memory.
        resnets: the ResNet blocks measured (``<path>.r`` correlations, ``<path>.resnet`` scalars).
        projs: the transformers whose projections were measured (``<path>.pi|po`` correlations,
            ``<path>.proj_in|proj_out`` scalars).
    """

    blocks: list[BlockInfo]
    corr: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    scalars: dict[str, torch.Tensor]
    timesteps: list[int]
    num_bins: int
    prompts: list[str]
    meta: dict = field(default_factory=dict)
    resnets: list[ResnetInfo] = field(default_factory=list)
    projs: list[ProjInfo] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step_bins(self) -> list[int]:
        return [step_to_bin(i, self.num_steps, self.num_bins) for i in range(self.num_steps)]

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        tensors = {f"corr/{k}": v for k, v in self.corr.items()}
        tensors.update({f"count/{k}": v for k, v in self.counts.items()})
        tensors.update({f"scalar/{k}": v for k, v in self.scalars.items()})
        with atomic_dir(out_dir) as tmp:
            digest = save_tensors(tmp / TENSORS, tensors, metadata={"format": STATS_FORMAT})
            write_json(tmp / META, {
                "format": STATS_FORMAT, "slimexport_version": __version__,
                "tensors": {"file": TENSORS, "sha256": digest},
                "blocks": [b.to_dict() for b in self.blocks], "resnets": [r.to_dict() for r in self.resnets],
                "projs": [t.to_dict() for t in self.projs],
                "timesteps": self.timesteps,
                "num_bins": self.num_bins, "prompts": self.prompts, "meta": self.meta,
            })
        return out_dir

    @staticmethod
    def read_prompts(folder: str | Path) -> list[str]:
        """The calibration prompts of saved statistics, without reading the tensors."""
        return list(read_json(Path(folder) / META, "calibration statistics")["prompts"])

    @classmethod
    def load(cls, folder: str | Path) -> CalibStats:
        folder = Path(folder)
        meta = read_json(folder / META, "calibration statistics")
        if meta.get("format") != STATS_FORMAT:
            raise IncompatibleArtifactError(f"{folder} holds statistics format {meta.get('format')!r}, expected {STATS_FORMAT!r}",
                                            "recalibrate with this slimexport version")
        tensors = load_tensors(folder / meta["tensors"]["file"], meta["tensors"]["sha256"], what="calibration statistics")
        out: dict[str, dict] = {"corr": {}, "count": {}, "scalar": {}}
        for k, v in tensors.items():
            kind, _, name = k.partition("/")
            if kind not in out:
                raise ArtifactError(f"unexpected tensor {k!r} in {folder / TENSORS}", "recalibrate")
            out[kind][name] = v
        check_stats(out["corr"], out["scalar"], len(meta["timesteps"]), int(meta["num_bins"]))  # NaN/Inf: module and bin
        return cls(blocks=[BlockInfo(**b) for b in meta["blocks"]], corr=out["corr"], counts=out["count"],
                   scalars=out["scalar"], timesteps=list(meta["timesteps"]), num_bins=int(meta["num_bins"]),
                   prompts=list(meta["prompts"]), meta=meta.get("meta", {}),
                   resnets=[ResnetInfo(**r) for r in meta.get("resnets", [])],
                   projs=[ProjInfo(**t) for t in meta.get("projs", [])])


def aggregate(stats: CalibStats, block, key: str, bin_weights: torch.Tensor | None) -> torch.Tensor:
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
