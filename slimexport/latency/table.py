"""The latency table: engine time per module as a function of its rank, measured on the target engine (pure).

A *group* is the modules of one kind with one shape signature (SD1.4 repeats its transformer and ResNet shapes
at each resolution level); each group holds the measured engine time of one module of it at a few ranks
(``widths``), in ms. The table reads them through their closest non-decreasing fit (least squares, pool-adjacent-
violators): at the aligned rank steps the allocation uses a narrower module is not slower, and on a shared CPU a
median that says so is noise. Between measured ranks the time is linear; below the lowest it continues the lowest
segment.

Costs. ``t_m(r)`` is module m's probe time at rank r. Part of it does not depend on the rank (an attention's
softmax over N×N scores, the residual of a probe): ``base_m``, the lowest segment extrapolated to rank 0
(clipped to ``[0, t_m(lowest)]``). :meth:`LatencyTable.level_costs` gives ``t_m(r) − base_m``: the time the
module's rank controls, so the targeted costs of two kinds sharing one layer (an attention's QK and VO pairs)
are not counted twice. Only differences enter the prediction, so the offset does not change it:

    predict_ms(ranks) = dense_ms − Σ_m s_k · (t_m(max_m) − t_m(r_m))

``dense_ms`` is the whole dense UNet on the engine: what no module's rank touches is in it, fixed. ``s_k``
(``scales``, per kind, 1 when absent) calibrates the probes against whole-UNet variants timed on the same engine
(``slimexport.latency.measure``): a module alone in a probe does not run exactly as it does among the UNet's
other layers, and the scale is the measured saving of a whole UNet over the probes' prediction of it.

The table is keyed (:class:`TableKey`: backend, device, dtype, shape, threads, versions, the UNet's
architecture), versioned (``format``) and saved atomically as JSON; a cached table is reused only under the same key.
Nothing here imports torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from slimexport.artifacts import read_json, sha256_json, write_json
from slimexport.errors import IncompatibleArtifactError, UsageError

TABLE_FORMAT = "slimexport.latency/1"
# The probe method (what a group's times mean); a change to it invalidates cached tables.
PROBE_VERSION = 1


@dataclass(frozen=True)
class TableKey:
    """What a latency table is valid for.

    Attributes:
        backend, device: the engine (``onnxruntime`` on ``cpu`` ...); device_name: the processor (``AMD EPYC``).
        dtype: the engine's dtype; threads: its CPU threads.
        batch, height, width: the shape timed: UNet rows (``2B``) and latent cells (the profile's optimum).
        versions: torch, onnx, onnxruntime, openvino, slimexport (``None`` where absent).
        arch: digest of the dense UNet's architecture (its config), not of its weights.
        probe: :data:`PROBE_VERSION`.
    """

    backend: str
    device: str
    device_name: str
    dtype: str
    threads: int
    batch: int
    height: int
    width: int
    versions: dict[str, str | None]
    arch: str
    probe: int = PROBE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def digest(self) -> str:
        """Content key: the cache file name's stem."""
        return sha256_json(self.to_dict())[:24]


def monotone_fit(values) -> tuple[float, ...]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks[-1]
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return tuple(m for m, n in blocks for _ in range(int(n)))


@dataclass(frozen=True)
class Group:
    """Modules of one kind and one shape signature, and their measured times.

    Attributes:
        kind: the kind (``slimexport.models.kinds.KINDS``); max_rank: the rank that keeps it dense.
        signature: the sizes that make the group (widths, heads, tokens, spatial size ...).
        widths: ranks measured, ascending (the largest is ``max_rank``).
        times_ms: per-module engine time at each width as measured (probe chain time minus the fixed per-call time,
            / copies); the table reads :attr:`fit_ms`.
        spread_ms: at each width, the interquartile range of the per-module time over the timed rounds (noise).
    """

    kind: str
    max_rank: int
    signature: dict[str, Any]
    widths: tuple[int, ...]
    times_ms: tuple[float, ...]
    spread_ms: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "times_ms", tuple(float(t) for t in self.times_ms))
        object.__setattr__(self, "spread_ms", tuple(float(t) for t in self.spread_ms))
        w = self.widths
        if not w or len(w) != len(self.times_ms) or any(b <= a for a, b in zip(w, w[1:])) or w[0] < 1:
            raise UsageError(f"latency group {self.kind} has widths {list(w)} and {len(self.times_ms)} times",
                             "widths must be ascending ranks >= 1, one time each (re-measure the table)")
        if w[-1] != self.max_rank:
            raise UsageError(f"latency group {self.kind} is measured up to rank {w[-1]}, not its dense rank {self.max_rank}",
                             "re-measure the table")

    @property
    def fit_ms(self) -> tuple[float, ...]:
        """The measured times' closest non-decreasing fit (module docstring)."""
        return monotone_fit(self.times_ms)

    def time_at(self, rank: float) -> float:
        """Interpolated time in ms at ``rank`` (of :attr:`fit_ms`: linear between widths; the end segments continue
        outside)."""
        w, t = self.widths, self.fit_ms
        if len(w) == 1:
            return t[0] * rank / w[0]  # one width: time proportional to rank
        i = min(max(bisect.bisect_right(w, rank) - 1, 0), len(w) - 2)
        a, b = w[i], w[i + 1]
        return t[i] + (t[i + 1] - t[i]) * (rank - a) / (b - a)

    @property
    def base_ms(self) -> float:
        """The rank-independent part: the time extrapolated to rank 0, within ``[0, time at the lowest width]``."""
        return min(max(self.time_at(0), 0.0), self.fit_ms[0])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "max_rank": self.max_rank, "signature": dict(self.signature), "widths": list(self.widths),
                "times_ms": list(self.times_ms), "spread_ms": list(self.spread_ms)}


@dataclass(frozen=True)
class LatencyTable:
    """Measured engine latency of a UNet's compressible modules at their ranks.

    Attributes:
        key: what it is valid for (:class:`TableKey`).
        dense_ms: the whole dense UNet on the engine (p50).
        groups: group id → :class:`Group`.
        members: module id (``<unit path>.<kind>``) → group id.
        scales: kind → ``s_k``, the probes' calibration against whole-UNet variants (module docstring).
        meta: how it was measured (copies per probe, iterations, seconds, where ``dense_ms`` came from, the
            calibration variants' predicted and measured savings).
    """

    key: TableKey
    dense_ms: float
    groups: dict[str, Group]
    members: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    format: str = TABLE_FORMAT

    def __post_init__(self):
        if not (isinstance(self.dense_ms, (int, float)) and self.dense_ms > 0):
            raise UsageError(f"latency table dense_ms={self.dense_ms!r}", "a positive time in ms (re-measure the table)")
        unknown = sorted({g for g in self.members.values() if g not in self.groups})
        if unknown:
            raise UsageError(f"latency table members point at missing groups ({unknown[0]}, ...)", "re-measure the table")

    # --- lookups -------------------------------------------------------------------------------------------------
    def group_of(self, module_id: str) -> Group:
        """The group of one module.

        Raises:
            UsageError: the table has no such module (measured for other targets or another UNet).
        """
        gid = self.members.get(module_id)
        if gid is None:
            raise UsageError(f"the latency table has no entry for {module_id}",
                             "measure the table with the targets being planned (measure_table(..., targets=...))")
        return self.groups[gid]

    def covers(self, module_ids: Iterable[str]) -> bool:
        return all(m in self.members for m in module_ids)

    def time_ms(self, module_id: str, rank: float) -> float:
        """``t_m(rank)``: the module's measured (interpolated) engine time."""
        return self.group_of(module_id).time_at(rank)

    def scale(self, kind: str) -> float:
        return float(self.scales.get(kind, 1.0))

    def level_costs(self, module_id: str, levels: Iterable[int]) -> list[float]:
        """The module's rank-dependent time at each rank level, ms: ``s_k · (t_m(r) − base_m)`` (module docstring)."""
        g = self.group_of(module_id)
        base, s = g.base_ms, self.scale(g.kind)
        return [s * max(g.time_at(r) - base, 0.0) for r in levels]

    def saved_ms(self, ranks: Mapping[str, int]) -> float:
        """``Σ_m s_k · (t_m(max_m) − t_m(r_m))`` over the modules in ``ranks``."""
        out = 0.0
        for name, r in ranks.items():
            g = self.group_of(name)
            out += self.scale(g.kind) * (g.time_at(g.max_rank) - g.time_at(r))
        return out

    def predict_ms(self, ranks: Mapping[str, int]) -> float:
        """Predicted latency of the UNet with these ranks (modules not named stay dense), ms."""
        return self.dense_ms - self.saved_ms(ranks)

    def prediction(self, ranks: Mapping[str, int]) -> dict:
        """``{"dense_ms", "predicted_ms", "predicted_speedup", "saved_ms", "table"}`` for a plan or a report."""
        pred = self.predict_ms(ranks)
        return {"dense_ms": round(self.dense_ms, 4), "predicted_ms": round(pred, 4),
                "predicted_speedup": round(self.dense_ms / pred, 4) if pred > 0 else None,
                "saved_ms": round(self.dense_ms - pred, 4), "table": self.key.digest, "backend": self.key.backend}

    # --- changes ------------------------------------------------------------------------------------------------
    def with_dense_ms(self, dense_ms: float, source: str = "given") -> LatencyTable:
        """The same table with another dense latency (e.g. measured together with the slim UNet)."""
        return replace(self, dense_ms=float(dense_ms), meta={**self.meta, "dense_source": source})

    def merged(self, other: LatencyTable) -> LatencyTable:
        """This table with ``other``'s groups and members added (same key); this one's dense latency is kept."""
        if other.key != self.key:
            raise UsageError("cannot merge latency tables of different keys", "measure both on the same engine and shape")
        return replace(self, groups={**self.groups, **other.groups}, members={**self.members, **other.members},
                       scales={**self.scales, **other.scales})

    # --- I/O ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": self.format, "key": self.key.to_dict(), "digest": self.key.digest, "dense_ms": self.dense_ms,
                "groups": {g: v.to_dict() for g, v in self.groups.items()}, "members": dict(self.members),
                "scales": dict(self.scales), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "latency table") -> LatencyTable:
        if d.get("format") != TABLE_FORMAT:
            raise IncompatibleArtifactError(f"{where} has format {d.get('format')!r}; this slimexport reads {TABLE_FORMAT!r}",
                                            "delete it and measure the table again")
        try:
            key = TableKey(**d["key"])
            groups = {g: Group(kind=v["kind"], max_rank=int(v["max_rank"]), signature=dict(v["signature"]),
                               widths=tuple(v["widths"]), times_ms=tuple(v["times_ms"]), spread_ms=tuple(v.get("spread_ms", ())))
                      for g, v in d["groups"].items()}
            return cls(key=key, dense_ms=float(d["dense_ms"]), groups=groups, members=dict(d["members"]),
                       meta=dict(d.get("meta") or {}), scales={k: float(v) for k, v in (d.get("scales") or {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise IncompatibleArtifactError(f"{where} lacks or mistypes {err}", "delete it and measure the table again") from err

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls.from_dict(read_json(path, "latency table"), where=str(path))


def table_path(cache_dir: str | Path, key: TableKey) -> Path:
    """Where the table of ``key`` is cached: ``<cache_dir>/latency-<digest>.json``."""
    return Path(cache_dir) / f"latency-{key.digest}.json"
