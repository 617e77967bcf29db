"""Measuring the latency table on the engine a build uses (ONNX Runtime, OpenVINO; TensorRT through the same path).

For each group (modules of one kind with one shape signature, ``slimexport.latency.table``) and each of a few
ranks spanning the allocation's rank levels, a *probe* graph is exported and timed on the backend:

- the module in its slim form at that rank: a copy of its unit (transformer block, ResNet block, transformer)
  resized by the kind's slim form (``slimexport.slim.shapes.SLIM_FORMS``), with the slim attention processor, and
  the module taken out of it (the attention, the feed-forward, the ResNet block, the projection), with fresh
  random weights (timing does not depend on them; denormals would, so the scale is the layers' default);
- ``copies`` distinct copies in a chain (``x → m₁ → m₂ → …``; summed side by side when a module changes the
  channel count), fed ``sample [2B, C, h, w]`` at the unit's resolution (the build profile's optimum divided by
  the level's downsampling), plus ``encoder_hidden_states`` or ``temb`` where the module reads them;
- exported through the same ONNX exporter and graph passes as the UNet (``export_traced``), and run by the
  backend's engine with the profile scaled to that resolution (OpenVINO compiles the same dynamic ranges).

The fixed per-call time (the runtime's call, the input's layout change) is subtracted: with ``T_k(w)`` the median
time of the probe of ``k`` copies at rank w and ``T_1`` of one copy at the dense rank,
``O = T_1 − (T_k(d) − T_1)/(k − 1)`` and ``t(w) = (T_k(w) − O)/k``. All probes of a group are timed in rounds, one
call of each per round in rotating order, so drift hits them alike. ``dense_ms`` is the whole dense UNet, exported and timed the same way (or given).

Calibration against whole-UNet variants. A module alone in a probe does not run exactly as among the UNet's other
layers (on the CPU machine the FFN probes' savings came out up to 1.8 times what whole slim UNets gained, the
attention probes' close to it). So, per ``--targets`` group (attention, FFN, ResNet, projections), one whole-UNet
variant is exported with that group's modules at the measured width nearest half their dense rank (fresh random
weights: only shapes matter), timed against the dense UNet in one process (interleaved), and the group's kinds get
the scale ``s = measured saving / predicted saving`` (``LatencyTable.scales``; within ``SCALE_RANGE``; 1 when the
predicted saving is under ``MIN_CALIBRATION_SAVING`` of the dense time). ``dense_ms`` is then those runs' dense
median.

Tables are cached in ``cache_dir`` by :class:`~slimexport.latency.table.TableKey` (backend, device, dtype,
threads, shape, versions, the UNet's architecture); a second call loads the table and measures only the groups
it lacks (new targets).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from slimexport._version import __version__
from slimexport.allocate.api import max_rank, rank_step
from slimexport.allocate.budget import ModuleCost
from slimexport.artifacts import ensure_dir, sha256_json
from slimexport.config import AllocConfig
from slimexport.engines.base import (
    BATCH_AXIS,
    CONTEXT,
    HEIGHT_AXIS,
    SAMPLE,
    WIDTH_AXIS,
    EngineConfig,
    EngineProfile,
    build_engine,
    make_feeds,
)
from slimexport.errors import ArtifactError, UsageError
from slimexport.latency.table import Group, LatencyTable, TableKey, table_path
from slimexport.models.arch import context_dim
from slimexport.models.kinds import KINDS, UNITS, Info, Kind, find_units, targeted_kinds
from slimexport.timer import CallTimer

log = logging.getLogger("slimexport")

PROBE_BACKENDS = ("onnxruntime", "openvino", "tensorrt")  # engines built from an ONNX export
DEFAULT_COPIES = 4  # modules per probe chain: the fixed per-call time is 1/4 of a small module's probe or less
DEFAULT_WIDTHS = 5  # ranks measured per group: the lowest level, the dense rank and evenly spaced ones between
DEFAULT_ROUNDS = 12  # timed rounds per group (one call of each probe per round)
DEFAULT_WARMUP = 2
DEFAULT_CALIBRATION_ITERATIONS = 6  # interleaved dense/variant calls per calibration variant (SD1.4 CPU: ~2 s each)
CALIBRATION_KEEP = 0.5  # calibration variants cut each module to the measured width nearest this keep ratio
MIN_CALIBRATION_SAVING = 0.02  # a predicted saving under this fraction of the dense time is too little signal
SCALE_RANGE = (0.2, 5.0)  # calibration scales outside this say the measurement failed, not the probes
TEMB = "temb"  # a ResNet probe's time-embedding input
SEQ_LEN = 77  # text tokens (CLIP) of a cross-attention probe


@dataclass(frozen=True)
class GroupPlan:
    """What to measure for one group.

    Attributes:
        gid: group id; kind: the kind; info: a member's unit info (the representative); members: module ids.
        h, w: the unit's input resolution at the timed shape; factor: the UNet latent over it.
        widths: ranks to measure (ascending, ending at ``max_rank``).
    """

    gid: str
    kind: Kind
    info: Info
    members: tuple[str, ...]
    h: int
    w: int
    factor: int
    widths: tuple[int, ...]
    max_rank: int

    @property
    def signature(self) -> dict:
        d = {k: v for k, v in self.info.to_dict().items() if k != "path"}
        return {**d, "h": self.h, "w": self.w}


# --- groups and widths (no engine) ---------------------------------------------------------------------------------
def spread_widths(levels: list[int], n: int) -> tuple[int, ...]:
    """``n`` ranks from ``levels`` (ascending): the lowest, the highest and the levels nearest to even steps between."""
    if n < 2 or len(levels) <= n:
        return tuple(levels if n >= 2 else levels[-1:])
    lo, hi = levels[0], levels[-1]
    picks = {min(levels, key=lambda r, t=lo + (hi - lo) * i / (n - 1): (abs(r - t), r)) for i in range(n)}
    return tuple(sorted(picks))


def unit_resolution(tokens: int, height: int, width: int) -> tuple[int, int, int]:
    """``(h, w, factor)`` of a unit seeing ``tokens`` positions when the UNet's latent is ``height × width``.

    Raises:
        UsageError: the positions are not the latent downsampled by a whole factor.
    """
    f = max(1, round(math.sqrt(height * width / tokens)))
    if height % f or width % f or (height // f) * (width // f) != tokens:
        raise UsageError(f"a unit with {tokens} positions is not the {height}x{width} latent downsampled by a whole factor",
                         "measure at a latent size that is a multiple of the UNet's downsampling (8 for SD)")
    return height // f, width // f, f


def plan_groups(unet, targets, height: int, width: int, alloc: AllocConfig | None = None,
                n_widths: int = DEFAULT_WIDTHS) -> dict[str, GroupPlan]:
    """The groups of the targeted modules at latent ``height × width``: modules of one kind with equal sizes and
    resolution share one; ranks to measure span the allocation's levels (``ModuleCost.rank_levels``).
    """
    from slimexport.models.macs import token_counts

    alloc = alloc or AllocConfig()
    tokens = token_counts(unet, height, width)
    kinds = targeted_kinds(targets)
    out: dict[str, GroupPlan] = {}
    members: dict[str, list[str]] = {}
    found = find_units(unet)
    for unit in UNITS.values():
        mine = [KINDS[k] for k in kinds if KINDS[k].unit == unit.name]
        if not mine:
            continue
        for info in found[unit.name]:
            h, w, f = unit_resolution(tokens[info.path], height, width)
            for kind in mine:
                d = max_rank(info, kind.name)
                q, r_min = rank_step(info, kind.name, alloc)
                levels = ModuleCost(name="", kind=kind.name, max_rank=d, unit_cost=1, r_min=r_min, quantum=q, score=0.0).rank_levels()
                sig = {k: v for k, v in info.to_dict().items() if k != "path"}
                gid = f"{kind.name}[{','.join(f'{k}={v}' for k, v in sig.items())},hw={h}x{w}]"
                if gid not in out:
                    out[gid] = GroupPlan(gid=gid, kind=kind, info=info, members=(), h=h, w=w, factor=f,
                                         widths=spread_widths(levels, n_widths), max_rank=d)
                members.setdefault(gid, []).append(kind.module_id(info))
    return {g: replace(p, members=tuple(members[g])) for g, p in out.items()}


# --- probes (module surgery through the slim forms) ----------------------------------------------------------------
def _slim_entry(kind: Kind, info: Info, rank: int) -> dict:
    """The unit's ``slim_plan.json`` entry giving ``kind`` rank ``rank`` (``slimexport.slim.shapes``); ``{}``: dense."""
    if rank == max_rank(info, kind.name):
        return {}
    if kind.slim == "head_rank":
        which, pair = kind.name.split(".")
        return {which: {f"rank_{pair}": rank}}
    if kind.slim == "ffn_width":
        return {"ffn_width": rank}
    if kind.slim == "resnet_inner":
        return {"resnet_inner": rank * info.group_size}
    if kind.slim == "lowrank":
        return {f"{kind.name}_rank": rank}
    raise UsageError(f"no latency probe for the slim form {kind.slim!r} of {kind.name}", "add one in slimexport/latency/measure.py")


def _probed_path(kind: Kind) -> str:
    """Path below the unit of the module a probe times (``""``: the unit itself)."""
    if kind.slim == "head_rank":
        return kind.name.split(".")[0]  # attn1 / attn2
    if kind.slim == "ffn_width":
        return kind.layers["up"].split(".")[0]  # ff
    if kind.slim == "lowrank":
        return kind.layers["layer"]
    return ""


def _fresh_weights(module: nn.Module, seed: int) -> None:
    """Default-initialised weights (the resized layers hold uninitialised memory): seeded, outside the global RNG."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            elif type(m).__name__ == "LowRankProj":
                m.u.normal_(0, m.in_features ** -0.5)
                m.v.normal_(0, m.rank ** -0.5)
                if m.bias is not None:
                    m.bias.zero_()


def slim_module(unet, kind: Kind, info: Info, rank: int, seed: int = 0) -> nn.Module:
    """The module of ``kind`` in ``info``'s unit at ``rank``, in its slim form, alone (a copy; ``unet`` is untouched)."""
    from slimexport.models.bundle import converted_copy
    from slimexport.slim.apply import install_processors
    from slimexport.slim.shapes import SLIM_FORMS

    holder = nn.Module()
    holder.add_module("unit", converted_copy(unet.get_submodule(info.path), "cpu", torch.float32, force_copy=True))
    entry = _slim_entry(kind, info, rank)
    if entry:
        SLIM_FORMS[kind.slim].resize(holder, "unit", holder.unit, kind, entry, dict(dtype=torch.float32, device=torch.device("cpu")))
    install_processors(holder, kernel=None)  # the slim attention processor, as in a slim UNet (no effect elsewhere)
    sub = _probed_path(kind)
    module = holder.get_submodule(f"unit.{sub}" if sub else "unit")
    _fresh_weights(module, seed)
    return module.eval().requires_grad_(False)


def _modules_by_id(unet) -> dict[str, tuple[Kind, Info]]:
    out = {}
    for unit_name, infos in find_units(unet).items():
        for info in infos:
            for kind in (k for k in KINDS.values() if k.unit == unit_name):
                out[kind.module_id(info)] = (kind, info)
    return out


def variant_unet(unet, ranks, seed: int = 0) -> nn.Module:
    """A copy of ``unet`` with the modules in ``ranks`` (module id → rank) in their slim forms at those ranks, fresh
    random weights in the resized units (timing only) and the slim attention processor on every attention."""
    from slimexport.models.bundle import converted_copy
    from slimexport.slim.apply import install_processors
    from slimexport.slim.shapes import SLIM_FORMS

    by_id = _modules_by_id(unet)
    unknown = sorted(set(ranks) - set(by_id))
    if unknown:
        raise UsageError(f"the UNet has no module {unknown[0]}", "pass module ids of this UNet (<unit path>.<kind>)")
    out = converted_copy(unet, "cpu", torch.float32, force_copy=True)
    kw = dict(dtype=torch.float32, device=torch.device("cpu"))
    resized = set()
    for mid, r in ranks.items():
        kind, info = by_id[mid]
        entry = _slim_entry(kind, info, r)
        if entry:
            SLIM_FORMS[kind.slim].resize(out, info.path, out.get_submodule(info.path), kind, entry, kw)
            resized.add(info.path)
    install_processors(out, kernel=None)
    for i, path in enumerate(sorted(resized)):
        _fresh_weights(out.get_submodule(path), seed + i)
    return out.eval()


class ProbeChain(nn.Module):
    """``copies`` modules run on one NCHW ``sample``: in a chain, or summed side by side when a module changes the
    channel count; token-layout modules see ``[2B, h·w, C]`` (one layout change in and out: fixed per call).

    Args:
        mods: the copies; call: ``"attn1"``, ``"attn2"`` (reads ``encoder_hidden_states``), ``"resnet"`` (reads
            ``temb``) or ``"plain"``; tokens: the modules take tokens, not NCHW.
    """

    def __init__(self, mods: list[nn.Module], call: str, tokens: bool, chain: bool):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.call, self.tokens, self.chain = call, tokens, chain

    def _one(self, m: nn.Module, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        if self.call == "attn2":
            return m(x, encoder_hidden_states=extra)
        if self.call == "resnet":
            return m(x, extra)
        return m(x)

    def forward(self, sample: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = sample.shape
        x = sample.flatten(2).transpose(1, 2) if self.tokens else sample
        if self.chain:
            for m in self.mods:
                x = self._one(m, x, extra)
        else:
            outs = [self._one(m, x, extra) for m in self.mods]
            x = outs[0]
            for o in outs[1:]:
                x = x + o
        if self.tokens:
            x = x.transpose(1, 2).reshape(b, x.shape[-1], h, w)
        return x


def _probe_io(kind: Kind, info: Info, unet, channels_in: int, channels_out: int, dtype: str) -> tuple[dict, str, bool]:
    """The probe's I/O spec (engine names and axes), its call convention and whether its modules take tokens."""
    act = "float16" if dtype == "fp16" else "float32"
    inputs = [{"name": SAMPLE, "dtype": act, "shape": [BATCH_AXIS, channels_in, HEIGHT_AXIS, WIDTH_AXIS]}]
    if kind.slim == "head_rank":
        call, tokens = kind.name.split(".")[0], True
        if call == "attn2":
            inputs.append({"name": CONTEXT, "dtype": act, "shape": [BATCH_AXIS, SEQ_LEN, context_dim(unet)]})
    elif kind.slim == "resnet_inner":
        call, tokens = "resnet", False
        if info.temb_dim:
            inputs.append({"name": TEMB, "dtype": act, "shape": [BATCH_AXIS, info.temb_dim]})
    else:
        call, tokens = "plain", kind.slim == "ffn_width" or (kind.slim == "lowrank" and not info.conv)
    outputs = [{"name": "latent", "dtype": act, "shape": [BATCH_AXIS, channels_out, HEIGHT_AXIS, WIDTH_AXIS]}]
    dyn = {e["name"]: {d: i for i, d in enumerate(e["shape"]) if isinstance(d, str)} for e in inputs + outputs}
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": dyn}, call, tokens


def _channels(kind: Kind, info: Info) -> tuple[int, int]:
    """The probed module's input and output channels."""
    if kind.slim == "resnet_inner":
        return info.in_channels, info.out_channels
    if kind.slim == "lowrank":
        return info.sizes(kind.name)
    return info.width, info.width


def export_probe(unet, plan: GroupPlan, rank: int, copies: int, batch: int, out_dir: Path, dtype: str = "fp32",
                 opset: int = 19):
    """Export the probe of ``copies`` modules of ``plan``'s group at ``rank`` to ``out_dir`` (an ONNX export folder)."""
    from slimexport.engines.onnx_export import export_traced
    from slimexport.models.bundle import converted_copy

    c_in, c_out = _channels(plan.kind, plan.info)
    io_spec, call, tokens = _probe_io(plan.kind, plan.info, unet, c_in, c_out, dtype)
    mods = [slim_module(unet, plan.kind, plan.info, rank, seed=i) for i in range(copies)]
    probe = ProbeChain(mods, call, tokens, chain=c_in == c_out)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    probe = converted_copy(probe, dtype=torch_dtype, fp32_norms=dtype == "fp16")
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(batch, c_in, plan.h, plan.w, generator=g).to(torch_dtype)]
    args += [torch.randn(*[batch if d == BATCH_AXIS else int(d) for d in e["shape"]], generator=g).to(torch_dtype)
             for e in io_spec["inputs"][1:]]
    return export_traced(probe.eval(), tuple(args), io_spec, out_dir, opset, "fp16" if dtype == "fp16" else "fp32")


def probe_profile(profile: EngineProfile, factor: int) -> EngineProfile:
    """The build profile at a unit's resolution (latent sizes divided by the level's downsampling ``factor``)."""
    def div(v: int) -> int:
        return max(1, v // factor)

    return EngineProfile(profile.min_batch, profile.opt_batch, profile.max_batch,
                         div(profile.min_height), div(profile.opt_height), div(profile.max_height),
                         div(profile.min_width), div(profile.opt_width), div(profile.max_width), latent_multiple=1)


# --- timing ------------------------------------------------------------------------------------------------------
def time_rounds(calls: list[Callable[[], object]], rounds: int, warmup: int, device: str = "cpu") -> list[list[float]]:
    """``rounds`` timed calls of each callable, one of each per round in rotating order; ms, ``[call][round]``."""
    timer = CallTimer(device)
    for fn in calls:
        for _ in range(warmup):
            fn()
    out: list[list[float]] = [[0.0] * rounds for _ in calls]
    n = len(calls)
    for r in range(rounds):
        order = [(r + i) % n for i in range(n)]
        for i in order:
            t = timer.time(calls[i])
            if timer.cuda:
                t = timer.collect()[0]
            out[i][r] = t
    return out


def per_module_times(chain_ms: list[list[float]], single_ms: list[float], copies: int) -> tuple[list[float], list[float]]:
    """Per-module times from the probes' timed calls (module docstring), from each probe's median, and their spread
    (each chain's interquartile range / ``copies``).

    ``chain_ms[i]``: calls of ``copies`` modules at width i (the last width is the dense rank); ``single_ms``: one
    module at the dense rank. Medians, not per-round differences: on a shared CPU a stalled call spoils a round,
    not a median.
    """
    t1 = statistics.median(single_ms)
    tk = [statistics.median(c) for c in chain_ms]
    overhead = t1 - (tk[-1] - t1) / (copies - 1)
    med = [(t - overhead) / copies for t in tk]
    iqr = [(q[2] - q[0]) / copies if len(c) >= 2 else 0.0 for c in chain_ms for q in [statistics.quantiles(c, n=4)]]
    return med, iqr


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "slimexport": __version__}
    for pkg in ("onnx", "onnxruntime", "openvino"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def architecture_digest(unet) -> str:
    """Digest of a UNet's architecture: its config and every parameter's shape (a slim UNet differs), not its weights.

    diffusers' bookkeeping keys (``_use_default_values``: a list in set order, different in every process;
    ``_name_or_path``) are left out."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return sha256_json({"config": config, "shapes": [(n, list(p.shape)) for n, p in unet.named_parameters()]})[:24]


def table_key(unet, backend: str, profile: EngineProfile, dtype: str = "fp32", device: str = "cpu",
              threads: int | None = None) -> TableKey:
    """The key a table measured with these settings gets (at the profile's optimum shape)."""
    from slimexport.engines.torch_runner import available_cpus, device_name

    return TableKey(backend=backend, device=device, device_name=device_name(device), dtype=dtype,
                    threads=threads or available_cpus(), batch=profile.opt_batch, height=profile.opt_height,
                    width=profile.opt_width, versions=_versions(), arch=architecture_digest(unet))


def _check_backend(backend: str) -> None:
    if backend not in PROBE_BACKENDS:
        raise UsageError(f"latency tables are measured on the ONNX engines ({', '.join(PROBE_BACKENDS)}), not {backend}",
                         "use --backend onnxruntime or openvino with --budget-metric latency (or --budget-metric macs)")


def measure_dense_ms(unet, backend: str, profile: EngineProfile, *, dtype: str = "fp32", device: str = "cpu",
                     threads: int | None = None, onnx_dir: str | Path | None = None, work_dir: str | Path | None = None,
                     iterations: int = 10, warmup: int = DEFAULT_WARMUP) -> float:
    """p50 ms of the whole dense UNet on the engine at the profile's optimum shape; ``onnx_dir``: an export of it to
    time (else it is exported into ``work_dir`` or a temporary folder, then removed)."""
    from slimexport.engines.onnx_export import export_unet_onnx

    _check_backend(backend)
    cfg = EngineConfig(device=device, threads=threads, profile=profile, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="latency-dense-", dir=work_dir) as tmp:
        folder = Path(onnx_dir) if onnx_dir is not None else None
        if folder is None:
            folder = Path(tmp) / "dense"
            c = int(unet.config.in_channels)
            export_unet_onnx(unet, folder, dtype="fp16" if dtype == "fp16" else "fp32",
                             sample_shape=(profile.opt_batch, c, profile.opt_height, profile.opt_width))
        engine = build_engine(backend, folder, cfg)
        try:
            feeds = make_feeds(engine.io_spec, profile.opt_batch, profile.opt_height, profile.opt_width, seed=0)
            times = time_rounds([engine.prepare(feeds)], iterations, warmup, device)[0]
        finally:
            engine.close()
    return float(statistics.median(times))


def measure_group(unet, plan: GroupPlan, backend: str, profile: EngineProfile, *, dtype: str = "fp32",
                  device: str = "cpu", threads: int | None = None, copies: int = DEFAULT_COPIES,
                  rounds: int = DEFAULT_ROUNDS, warmup: int = DEFAULT_WARMUP, work_dir: str | Path | None = None) -> Group:
    """Export and time one group's probes (every width with ``copies`` modules, and one module at the dense rank)."""
    if copies < 2:
        raise UsageError(f"copies={copies} cannot separate the fixed per-call time", "use copies >= 2")
    prof = probe_profile(profile, plan.factor)
    cfg = EngineConfig(device=device, threads=threads, profile=prof, dtype=dtype)
    engines = []
    with tempfile.TemporaryDirectory(prefix="latency-probe-", dir=work_dir) as tmp:
        try:
            variants = [(w, copies) for w in plan.widths] + [(plan.max_rank, 1)]
            for i, (rank, k) in enumerate(variants):
                folder = export_probe(unet, plan, rank, k, prof.opt_batch, Path(tmp) / f"p{i}", dtype=dtype).folder
                engines.append(build_engine(backend, folder, cfg))
            feeds = make_feeds(engines[0].io_spec, prof.opt_batch, prof.opt_height, prof.opt_width, seed=0)
            times = time_rounds([e.prepare(feeds) for e in engines], rounds, warmup, device)
        finally:
            for e in engines:
                e.close()
    med, iqr = per_module_times(times[:-1], times[-1], copies)
    return Group(kind=plan.kind.name, max_rank=plan.max_rank, signature=plan.signature, widths=plan.widths,
                 times_ms=tuple(med), spread_ms=tuple(iqr))


def calibration_ranks(table: LatencyTable, module_ids, keep: float = CALIBRATION_KEEP) -> dict[str, int]:
    """Each module at its group's measured width nearest ``keep`` × its dense rank (a calibration variant)."""
    out = {}
    for m in module_ids:
        g = table.group_of(m)
        out[m] = min(g.widths, key=lambda w: (abs(w - keep * g.max_rank), w))
    return out


def fit_scale(predicted_ms: float, measured_ms: float, dense_ms: float) -> float | None:
    """``measured / predicted`` saving within ``SCALE_RANGE``; ``None`` when the prediction is too small to learn from."""
    if predicted_ms < MIN_CALIBRATION_SAVING * dense_ms:
        return None
    lo, hi = SCALE_RANGE
    return min(max(measured_ms / predicted_ms, lo), hi)


def calibrate_table(unet, table: LatencyTable, targets, backend: str, profile: EngineProfile, dense_dir: Path, *,
                    dtype: str = "fp32", device: str = "cpu", threads: int | None = None,
                    iterations: int = DEFAULT_CALIBRATION_ITERATIONS, work_dir: Path | None = None,
                    say: Callable = log.info) -> tuple[dict[str, float], dict[str, dict], list[float]]:
    """Scales of the ``targets`` groups' kinds from whole-UNet variants (module docstring).

    Returns ``(kind → scale, target → details, dense p50s)``; details hold the variant's ranks' keep, the predicted and
    measured savings and the measured speed-up.
    """
    from slimexport.bench.timing import compare_speed
    from slimexport.engines.onnx_export import export_unet_onnx

    cfg = EngineConfig(device=device, threads=threads, profile=profile, dtype=dtype)
    shape = (profile.opt_batch, int(unet.config.in_channels), profile.opt_height, profile.opt_width)
    kinds_of = {m: table.group_of(m).kind for m in table.members}
    scales, details, dense_p50 = {}, {}, []
    dense = build_engine(backend, dense_dir, cfg)
    try:
        feeds = make_feeds(dense.io_spec, shape[0], shape[2], shape[3], seed=0)
        for target in targets:
            kinds = [k.name for k in KINDS.values() if k.target == target]
            mids = [m for m, k in kinds_of.items() if k in kinds]
            if not mids:
                continue
            ranks = calibration_ranks(table, mids)
            predicted = LatencyTable(key=table.key, dense_ms=table.dense_ms, groups=table.groups, members=table.members).saved_ms(ranks)
            if predicted < MIN_CALIBRATION_SAVING * table.dense_ms:
                details[target] = {"predicted_ms": predicted, "skipped": "predicted saving too small to calibrate on"}
                continue
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="latency-variant-", dir=work_dir) as tmp:
                variant = variant_unet(unet, ranks)
                export_unet_onnx(variant, Path(tmp) / target, dtype="fp16" if dtype == "fp16" else "fp32", sample_shape=shape)
                del variant
                engine = build_engine(backend, Path(tmp) / target, cfg)
                try:
                    speed = compare_speed(dense, engine, feeds, warmup=1, iterations=iterations)
                finally:
                    engine.close()
            measured = speed["dense_ms"]["p50"] - speed["slim_ms"]["p50"]
            dense_p50.append(speed["dense_ms"]["p50"])
            scale = fit_scale(predicted, measured, speed["dense_ms"]["p50"])
            details[target] = {"keep": CALIBRATION_KEEP, "modules": len(mids), "predicted_ms": round(predicted, 3),
                               "measured_ms": round(measured, 3), "dense_ms": round(speed["dense_ms"]["p50"], 3),
                               "speedup": round(speed["speedup"], 4), "scale": scale,
                               "raw_scale": round(measured / predicted, 4)}
            if scale is not None:
                scales.update({k: scale for k in kinds})
            say("latency table: calibrated %s on a whole UNet: saved %.1f ms, the probes predicted %.1f ms (scale %s, %.0f s)",
                target, measured, predicted, "none" if scale is None else f"{scale:.3f}", time.perf_counter() - t1)
    finally:
        dense.close()
    return scales, details, dense_p50


def build_table(cfg, unet, profile: EngineProfile, *, device: str, cache_dir: str | Path | None, progress: bool = True,
                targets=None, dense_onnx: str | Path | None = None) -> LatencyTable:
    """The table a build (``cfg``: a ``BuildConfig``) allocates by under ``--budget-metric latency``: measured on its
    backend, dtype and device at its profile (:func:`measure_table`), or loaded from ``cache_dir``; ``targets``:
    the groups to cover (default the build's ``--targets``)."""
    if cfg.backend not in PROBE_BACKENDS:
        raise UsageError(f"--budget-metric latency measures the engine per module, on {' or '.join(PROBE_BACKENDS)} "
                         f"(ONNX engines), not --backend {cfg.backend}", "use --backend onnxruntime or openvino, or "
                         "--budget-metric macs")
    return measure_table(unet, targets or cfg.compress.alloc.targets, profile, cfg.backend, cfg.export.dtype,
                         cache_dir=cache_dir, device=device, alloc=cfg.compress.alloc, dense_onnx=dense_onnx,
                         progress=progress)


def measure_table(unet, targets, profile: EngineProfile, backend: str = "onnxruntime", dtype: str = "fp32", *,
                  cache_dir: str | Path | None = None, device: str = "cpu", threads: int | None = None,
                  dense_ms: float | None = None, dense_onnx: str | Path | None = None, alloc: AllocConfig | None = None,
                  copies: int = DEFAULT_COPIES, n_widths: int = DEFAULT_WIDTHS, rounds: int = DEFAULT_ROUNDS,
                  warmup: int = DEFAULT_WARMUP, calibrate: bool = True,
                  calibration_iterations: int = DEFAULT_CALIBRATION_ITERATIONS, progress: bool = True,
                  work_dir: str | Path | None = None) -> LatencyTable:
    """The latency table of ``unet``'s targeted modules on ``backend`` at the profile's optimum shape.

    Args:
        unet: the dense diffusers UNet (any device; copies of its units are probed on the CPU side of the export).
        targets: ``--targets`` groups (``("attn", "ffn")`` ...).
        profile: the build's engine profile (probes are timed at its optimum and compiled for its ranges).
        backend: ``onnxruntime``, ``openvino`` (or ``tensorrt``); dtype: the engine's (``fp32``, ``fp16``, ``bf16``).
        cache_dir: where tables are cached as JSON (``None``: no cache); a table of the same key is loaded and only
            the groups it lacks are measured (then saved with them).
        threads: the engine's CPU threads (``None``: the cores this process may use).
        dense_ms: the dense UNet's latency if the caller measured it (else the cached one, else measured here from
            ``dense_onnx``, an export folder of it, or a new export).
        alloc: its quanta and ``r_min`` set the rank levels the widths span (default ``AllocConfig()``).
        copies, n_widths, rounds, warmup: the probe method (module docstring).
        calibrate: scale each targeted group's probes by a whole-UNet variant timed on the engine (module
            docstring; kinds already calibrated in a cached table are not measured again).
        calibration_iterations: interleaved calls of the dense and the variant UNet per calibration variant.
        progress: log each group with the elapsed time (INFO; DEBUG otherwise).
        work_dir: where probe exports are written (temporary folders, removed).

    Returns:
        :class:`LatencyTable` (its ``meta`` says what was measured now and how long it took).

    Raises:
        UsageError: a backend without probes (torch, aoti, torch-compile), or bad settings.
    """
    _check_backend(backend)
    say = log.info if progress else log.debug
    t0 = time.perf_counter()
    key = table_key(unet, backend, profile, dtype, device, threads)
    path = table_path(cache_dir, key) if cache_dir is not None else None
    cached = None
    if path is not None and path.exists():
        try:
            cached = LatencyTable.load(path)
        except (ArtifactError, UsageError) as err:
            log.warning("latency table %s is unreadable (%s); measuring again", path, err)
        if cached is not None and cached.key != key:
            cached = None
    plans = plan_groups(unet, targets, profile.opt_height, profile.opt_width, alloc, n_widths)
    todo = [p for p in plans.values() if cached is None or p.gid not in cached.groups]
    groups = dict(cached.groups) if cached is not None else {}
    members = dict(cached.members) if cached is not None else {}
    if cached is not None:
        say("latency table: %s loaded (%d groups cached, %d to measure)", path, len(plans) - len(todo), len(todo))
    work = ensure_dir(work_dir) if work_dir is not None else None
    for i, p in enumerate(todo):
        t1 = time.perf_counter()
        groups[p.gid] = measure_group(unet, p, backend, profile, dtype=dtype, device=device, threads=threads, copies=copies,
                                      rounds=rounds, warmup=warmup, work_dir=work)
        g = groups[p.gid]
        say("latency table [%d/%d] %s (%d modules): %s ms at ranks %s (%.0f s, %.0f s in all)", i + 1, len(todo), p.gid,
            len(p.members), ", ".join(f"{t:.3f}" for t in g.times_ms), list(g.widths), time.perf_counter() - t1,
            time.perf_counter() - t0)
    for p in plans.values():
        members.update({m: p.gid for m in p.members})
    dense_source = "given"
    if dense_ms is None and cached is not None:
        dense_ms, dense_source = cached.dense_ms, cached.meta.get("dense_source", "measured")
    scales = dict(cached.scales) if cached is not None else {}
    calibration = dict((cached.meta if cached is not None else {}).get("calibration", {}))
    uncalibrated = [t for t in targets if calibrate and t not in calibration]
    with tempfile.TemporaryDirectory(prefix="latency-dense-", dir=work) as tmp:
        dense_dir = Path(dense_onnx) if dense_onnx is not None else None
        if uncalibrated or dense_ms is None:
            if dense_dir is None:
                from slimexport.engines.onnx_export import export_unet_onnx

                dense_dir = Path(tmp) / "dense"
                export_unet_onnx(unet, dense_dir, dtype="fp16" if dtype == "fp16" else "fp32",
                                 sample_shape=(profile.opt_batch, int(unet.config.in_channels), profile.opt_height, profile.opt_width))
        first = None
        if dense_ms is None:
            say("latency table: timing the dense UNet on %s (%.0f s so far)", backend, time.perf_counter() - t0)
            dense_ms = first = measure_dense_ms(unet, backend, profile, dtype=dtype, device=device, threads=threads,
                                                onnx_dir=dense_dir, work_dir=work)
            dense_source = "measured"
        if uncalibrated:
            probe_table = LatencyTable(key=key, dense_ms=float(dense_ms), groups=groups, members=members)
            new, details, dense_p50 = calibrate_table(unet, probe_table, uncalibrated, backend, profile, dense_dir, dtype=dtype,
                                                      device=device, threads=threads, iterations=calibration_iterations,
                                                      work_dir=work, say=say)
            scales.update(new)
            calibration.update(details)
            if dense_p50 and dense_source != "given":  # the dense time of every timed run, interleaved ones included
                dense_ms, dense_source = statistics.median(dense_p50 + ([first] if first is not None else [])), "measured"
    meta = {**(cached.meta if cached is not None else {}), "copies": copies, "rounds": rounds, "warmup": warmup,
            "dense_source": dense_source, "measured_groups": [p.gid for p in todo], "calibration": calibration,
            "seconds": round(time.perf_counter() - t0, 1)}
    table = LatencyTable(key=key, dense_ms=float(dense_ms), groups=groups, members=members, meta=meta, scales=scales)
    if path is not None and (todo or uncalibrated or cached is None or dense_source == "measured" and cached.dense_ms != dense_ms):
        table.save(path)
    say("latency table: %d groups, dense %.2f ms, %.0f s", len(groups), table.dense_ms, time.perf_counter() - t0)
    return table
