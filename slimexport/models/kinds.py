"""The table of compressible module kinds: what each kind is in a diffusers UNet, and what every stage needs of it.

A *unit* is a module the collector hooks and the decomposition works through one at a time (a transformer block,
a ResNet block, a transformer's projections); it holds one or more *kinds*, each a compressible module with a
rank. Calibration, scoring, allocation, decomposition, MAC counting and the slim rebuild read these two tables
(``UNITS``, ``KINDS``) instead of branching on kind names; diffusers' module names appear here, in ``arch.py`` and
in ``slimexport/slim/``, nowhere else. Adding a kind is one ``Kind`` entry (plus a ``Unit`` when it lives in a
new kind of module) and its maths: a decomposition registered under ``Kind.decomposition`` in
``slimexport/decompose/methods.py`` and, where the slim layer is new, its rebuild in ``slimexport/slim/``
(``docs/method-notes.md``, "Adding a module kind").

Rank units: per-head rank for attention pairs (all heads alike), channels for the FFN, GroupNorm groups for a
ResNet block's inner width, factor rank for a projection.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from slimexport.models.arch import (
    BlockInfo,
    ProjInfo,
    ResnetInfo,
    blocks,
    projections,
    resnet_blocks,
)

Info = BlockInfo | ResnetInfo | ProjInfo

# Statistic keys (``CalibStats.corr`` and ``.scalars`` hold ``<unit path>.<key>``).
X = "x"  # attn1's input (norm1 output), per bin: attn1 QK and VO
Y = "y"  # attn2's query input (norm2 output), per bin
E = "e"  # the text tokens attn2's keys and values read, all steps together
Z = "z"  # the GEGLU output (ff.net.2's input), per bin
R = "r"  # a ResNet block's inner channels (conv2's input), per bin
PI = "pi"  # proj_in's input, per bin
PO = "po"  # proj_out's input, per bin
BLOCK_IN = "out.block_in"  # energy of the unit's input (the propagation factor's denominator)
STAT_NAMES = {X: "attn1 input", Y: "attn2 query input", E: "text tokens", Z: "GEGLU output", R: "ResNet inner channels",
              PI: "proj_in input", PO: "proj_out input"}


@dataclass(frozen=True)
class Tap:
    """One forward hook of the collector on a sub-module of a unit.

    Attributes:
        module: sub-module path below the unit (``""``: the unit itself).
        stat: correlation key accumulated from the sub-module's input (``Σ xᵀx``, channels last; its ``‖x‖²`` per
            step is a scalar of the same key).
        energy: scalar key of the output's energy per step (``‖y − b‖²`` with ``subtract_bias``).
        on_input: ``energy`` is of the input instead (a pre-hook; ``kwarg`` names the input when passed by keyword).
    """

    module: str
    stat: str | None = None
    energy: str | None = None
    subtract_bias: bool = False
    on_input: bool = False
    kwarg: str = "hidden_states"


@dataclass(frozen=True)
class Unit:
    """A module kind the collector hooks and the decomposition visits.

    Attributes:
        name: its name (``CalibStats`` keeps its infos in the field ``stats_field``).
        module_class: the diffusers class of its modules.
        find: the unit's infos in a UNet, in module order (raises ``UsageError`` on an unsupported layout).
        info: its info class (``to_dict``/``Info(**d)`` round trip in the statistics' JSON).
        stats: statistic key → its width, for this unit's correlations.
        binned: the keys collected per timestep bin (the rest over all steps together).
        taps: the collector's hooks.
        token_module: the sub-module whose input positions are the unit's tokens (MAC counting).
        optional: a model may lack it, or have it in a form that cannot be slimmed (the collector then skips it).
    """

    name: str
    module_class: str
    find: Callable[[nn.Module], list]
    info: type
    stats_field: str
    stats: dict[str, Callable[[Info], int]]
    binned: frozenset[str]
    taps: tuple[Tap, ...]
    token_module: str
    optional: bool = False


@dataclass(frozen=True)
class Kind:
    """One compressible module kind.

    Attributes:
        name: suffix of its module ids (``<unit path>.<name>``) and of plan entries.
        unit: the ``Unit`` it lives in.
        target: the ``--targets`` group that selects it.
        input_stat: statistic key of its input (the score's ``C_m``); ``output_energy``: scalar key of its output
            energy (the propagation factor's numerator).
        layers: role → sub-module path below the unit of each weight the decomposition reads and replaces.
        input_layer: the role whose weight is ``A_m`` (input side) of the spectral influence score.
        whiten: statistic keys the decomposition whitens with (query side first).
        decomposition: its closed form's name in ``slimexport.decompose.methods.METHODS``.
        slim: how the slim UNet holds it (``slimexport.slim.apply``): narrower heads, narrower FFN, fewer ResNet
            groups, or a factor pair.
        max_rank: the rank that keeps it dense.
        input_width: width of its input (the score's ``n_m``).
        unit_params: parameters per unit of rank.
        unit_macs: MACs per unit of rank at batch 1, given the unit's tokens and the text tokens.
        quantum: rank step, given the ``AllocConfig`` override named by ``quantum_option`` (``None``: not set).
        floor_is_quantum: the smallest rank is one quantum (otherwise ``AllocConfig.r_min``).
    """

    name: str
    unit: str
    target: str
    input_stat: str
    output_energy: str
    layers: dict[str, str]
    input_layer: str
    whiten: tuple[str, ...]
    decomposition: str
    slim: str
    max_rank: Callable[[Info], int]
    input_width: Callable[[Info], int]
    unit_params: Callable[[Info], int]
    unit_macs: Callable[[Info, int, int], int]
    quantum: Callable[[Info, int | None], int]
    quantum_option: str | None = None
    floor_is_quantum: bool = False

    def module_id(self, info: Info) -> str:
        return f"{info.path}.{self.name}"

    def layer(self, unit_module: nn.Module, role: str) -> nn.Module | None:
        """The layer of ``role`` in the unit's module (``None`` where the model has none, e.g. no time embedding)."""
        mod = unit_module
        for part in self.layers[role].split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                return None
        return mod


# --- rank steps (method §7, export conventions §10) -------------------------------------------------------------
# 8 per head keeps flash/SDPA kernels on their fast path; 64 FFN channels keep GEMM widths tensor-core friendly.
# Tiny models scale both down.
SD_ATTN_QUANTUM = 8
SD_FFN_QUANTUM = 64
SD_HEAD_DIM = 40
SD_FFN_WIDTH = 1024
# ResNet inner widths are cut in whole GroupNorm groups; at SD size a step is the fewest groups whose channel
# count is a multiple of 16 (tensor-core alignment: widths off multiples of 16 lose the speed-up).
SD_RESNET_ALIGN = 16
SD_RESNET_MIN_INNER = 320
# Factored projections: ranks in steps of 32 at SD size (tensor-core friendly GEMM widths, 5 levels for 320
# channels), scaled down for tiny models.
SD_PROJ_QUANTUM = 32
SD_PROJ_MIN_RANK = 160


def attn_quantum(head_dim: int, override: int | None = None) -> int:
    if override is not None:
        return min(override, head_dim)
    return SD_ATTN_QUANTUM if head_dim >= SD_HEAD_DIM else max(2, head_dim // 8)


def ffn_quantum(width: int, override: int | None = None) -> int:
    if override is not None:
        return min(override, width)
    return SD_FFN_QUANTUM if width >= SD_FFN_WIDTH else max(4, width // 32)


def resnet_quantum(r: ResnetInfo, override: int | None = None) -> int:
    """Rank step in groups."""
    if r.inner < SD_RESNET_MIN_INNER:
        return 1
    return math.lcm(r.group_size, SD_RESNET_ALIGN) // r.group_size


def proj_quantum(max_rank: int) -> int:
    return SD_PROJ_QUANTUM if max_rank >= SD_PROJ_MIN_RANK else max(2, max_rank // 8)


def proj_break_even(p: ProjInfo, kind: str) -> int:
    """The rank at which the factor pair costs what the dense layer does: ``⌊in·out / (in + out)⌋``.

    It is the projection's ``max_rank``: at this rank the layer is kept dense (no factors, no error)."""
    n_in, n_out = p.sizes(kind)
    return n_in * n_out // (n_in + n_out)


# --- the units ----------------------------------------------------------------------------------------------------
BLOCK = Unit(
    name="block", module_class="BasicTransformerBlock", find=blocks, info=BlockInfo, stats_field="blocks",
    stats={X: lambda b: b.width, Y: lambda b: b.width, Z: lambda b: b.ffn_width, E: lambda b: b.context_dim},
    binned=frozenset({X, Y, Z}),
    taps=(
        Tap("attn1.to_q", stat=X, energy="attn1.qk"),
        Tap("attn1.to_v", energy="attn1.vo"),
        Tap("attn2.to_q", stat=Y, energy="attn2.qk"),
        Tap("attn2.to_v", stat=E, energy="attn2.vo"),
        Tap("ff.net.2", stat=Z, energy="ff", subtract_bias=True),
        Tap("attn1", energy="out.attn1"),
        Tap("attn2", energy="out.attn2"),
        Tap("ff", energy="out.ff"),
        Tap("", energy=BLOCK_IN, on_input=True, kwarg="hidden_states"),
    ),
    token_module="attn1.to_q",
)
RESNET = Unit(
    name="resnet", module_class="ResnetBlock2D", find=resnet_blocks, info=ResnetInfo, stats_field="resnets",
    stats={R: lambda r: r.inner}, binned=frozenset({R}),
    taps=(Tap("conv2", stat=R, energy="resnet", subtract_bias=True),
          Tap("", energy=BLOCK_IN, on_input=True, kwarg="input_tensor")),
    token_module="conv2", optional=True,
)
PROJ = Unit(
    name="proj", module_class="Transformer2DModel", find=projections, info=ProjInfo, stats_field="projs",
    stats={PI: lambda t: t.channels, PO: lambda t: t.inner}, binned=frozenset({PI, PO}),
    taps=(Tap("proj_in", stat=PI, energy="proj_in", subtract_bias=True),
          Tap("proj_out", stat=PO, energy="proj_out", subtract_bias=True),
          Tap("", energy=BLOCK_IN, on_input=True, kwarg="hidden_states")),
    token_module="", optional=True,
)
UNITS: dict[str, Unit] = {u.name: u for u in (BLOCK, RESNET, PROJ)}


# --- the kinds ----------------------------------------------------------------------------------------------------
def _attn(which: str, pair: str) -> Kind:
    """attn1/attn2 × QK/VO: Type II (QK) and Type III (VO) whitening-SVD per head (method §3–4)."""
    self_attn = which == "attn1"
    q_stat, kv_stat = (X, X) if self_attn else (Y, E)
    qk = pair == "qk"

    def params(b: BlockInfo) -> int:  # all H heads: one row of each of the pair's two projections
        return b.num_heads * (b.width + (b.width if self_attn else b.context_dim))

    def macs(b: BlockInfo, n: int, seq_len: int) -> int:  # projections plus the score (QK) or P·V (VO) products
        if self_attn:
            return b.num_heads * n * (2 * b.width + n)
        return b.num_heads * (n * b.width + seq_len * b.context_dim + n * seq_len)

    return Kind(
        name=f"{which}.{pair}", unit="block", target="attn",
        input_stat=q_stat if qk else kv_stat, output_energy=f"out.{which}",
        layers=({"left": f"{which}.to_q", "right": f"{which}.to_k"} if qk
                else {"left": f"{which}.to_v", "right": f"{which}.to_out.0"}),
        input_layer="left", whiten=(q_stat, kv_stat) if qk else (kv_stat,),
        decomposition="qk_whiten_svd" if qk else "vo_whiten_svd", slim="head_rank",
        max_rank=lambda b: b.head_dim,
        input_width=lambda b: b.context_dim if (not self_attn and not qk) else b.width,
        unit_params=params, unit_macs=macs,
        quantum=lambda b, o: attn_quantum(b.head_dim, o), quantum_option="attn_quantum",
    )


FFN = Kind(
    name="ff", unit="block", target="ffn", input_stat=Z, output_energy="out.ff",
    layers={"up": "ff.net.0.proj", "down": "ff.net.2"}, input_layer="down", whiten=(Z,),
    decomposition="ffn_nystrom", slim="ffn_width",
    max_rank=lambda b: b.ffn_width, input_width=lambda b: b.ffn_width,
    unit_params=lambda b: 2 * (b.width + 1) + b.width,  # GEGLU content + gate rows (with biases) + one down column
    unit_macs=lambda b, n, s: 3 * n * b.width,  # GEGLU content + gate columns, one down-projection row, per token
    quantum=lambda b, o: ffn_quantum(b.ffn_width, o), quantum_option="ffn_quantum",
)


def _resnet_params(r: ResnetInfo) -> int:
    """One group: conv1 rows + bias, time_emb_proj rows + bias, norm2 affine, conv2 columns."""
    per_channel = r.in_channels * r.kernel1 + 1 + (r.temb_dim + 1 if r.temb_dim else 0) + 2
    return r.group_size * (per_channel + r.out_channels * r.kernel2)


def _resnet_macs(r: ResnetInfo, n: int, seq_len: int) -> int:
    """conv1 rows and conv2 columns per pixel, time_emb_proj rows once."""
    return r.group_size * (n * (r.in_channels * r.kernel1 + r.out_channels * r.kernel2) + r.temb_dim)


RESNET_INNER = Kind(
    name="resnet", unit="resnet", target="resnet", input_stat=R, output_energy="resnet",
    layers={"conv1": "conv1", "norm": "norm2", "conv2": "conv2", "temb": "time_emb_proj"}, input_layer="conv2",
    whiten=(R,), decomposition="resnet_group_nystrom", slim="resnet_inner",
    max_rank=lambda r: r.groups, input_width=lambda r: r.inner,
    unit_params=_resnet_params, unit_macs=_resnet_macs, quantum=resnet_quantum, floor_is_quantum=True,
)


def _proj(kind: str) -> Kind:
    """proj_in/proj_out as a rank-r factor pair ``(x U) V + b`` by whitened SVD (method notes §14)."""
    stat = PI if kind == "proj_in" else PO
    return Kind(
        name=kind, unit="proj", target="proj", input_stat=stat, output_energy=kind,
        layers={"layer": kind}, input_layer="layer", whiten=(stat,), decomposition="proj_whiten_svd", slim="lowrank",
        max_rank=lambda t: proj_break_even(t, kind), input_width=lambda t: t.sizes(kind)[0],
        unit_params=lambda t: sum(t.sizes(kind)),  # one column of U and one row of V
        unit_macs=lambda t, n, s: n * sum(t.sizes(kind)),
        quantum=lambda t, o: proj_quantum(proj_break_even(t, kind)), floor_is_quantum=True,
    )


KINDS: dict[str, Kind] = {k.name: k for k in (
    _attn("attn1", "qk"), _attn("attn1", "vo"), _attn("attn2", "qk"), _attn("attn2", "vo"), FFN, RESNET_INNER,
    _proj("proj_in"), _proj("proj_out"),
)}
# The --targets groups, in the order their kinds are planned.
TARGETS: dict[str, tuple[str, ...]] = {}
for _k in KINDS.values():
    TARGETS.setdefault(_k.target, ())
    TARGETS[_k.target] += (_k.name,)


def unit_kinds(unit: str) -> tuple[Kind, ...]:
    """The kinds living in a unit, in table order."""
    return tuple(k for k in KINDS.values() if k.unit == unit)


def targeted_kinds(targets) -> tuple[str, ...]:
    """The kind names selected by ``--targets`` groups, in table order (attn, ffn, resnet, proj)."""
    return tuple(k.name for k in KINDS.values() if k.target in targets)


def stat_keys(unit: Unit) -> tuple[str, ...]:
    """The unit's per-step scalar keys: each statistic's ``‖x‖²`` and each tap's energy, in tap order."""
    out: list[str] = []
    for t in unit.taps:
        for key in (t.energy, t.stat):
            if key is not None and key not in out:
                out.append(key)
    return tuple(out)


def find_units(unet: nn.Module) -> dict[str, list]:
    """Every unit's infos in ``unet``: ``{unit name: [info, ...]}`` (a required unit that is absent or unsupported
    raises ``UsageError``; an optional one is left out when it cannot be slimmed)."""
    from slimexport.errors import UsageError

    out = {}
    for u in UNITS.values():
        try:
            out[u.name] = u.find(unet)
        except UsageError as err:
            if not u.optional:
                raise
            logging.getLogger("slimexport").info("%s statistics not collected: %s", u.name, err)
            out[u.name] = []
    return out
