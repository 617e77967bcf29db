"""Stage configs: frozen dataclasses, validated on construction, with a versioned dict round-trip.

Each stage takes exactly one config; ``BuildConfig`` nests them. ``from_dict`` rejects unknown keys so a
typo in a config file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimexport.errors import ConfigError, UsageError

CONFIG_VERSION = 1

TARGETS = ("attn", "ffn", "resnet")
DEFAULT_TARGETS = ("attn", "ffn")
TIMESTEP_WEIGHTINGS = ("spectral", "uniform")
FFN_SELECTIONS = ("cpqr", "leverage", "weight", "random")
QKVO_METHODS = ("whiten", "weight", "random")
ALLOCATIONS = ("softmax", "uniform")
DTYPES = ("fp32", "fp16", "bf16")
BACKENDS = ("onnxruntime", "tensorrt", "torch")
BUDGET_SCOPES = ("targeted", "unet")


def _check(cls: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(cls, name, value, allowed)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Config:
    """Shared dict round-trip for the frozen stage configs."""

    _nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, _Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise UsageError(
                f"{cls.__name__} has config version {version}, this slimexport reads version {CONFIG_VERSION}",
                "re-create the config with this version (slimexport ... --dump-config)",
            )
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UsageError(
                f"{cls.__name__} has no field(s) {', '.join(unknown)}", f"valid fields: {', '.join(sorted(names))}"
            )
        kwargs = {}
        for k, v in data.items():
            sub = cls._nested.get(k)
            if sub is not None and isinstance(v, dict):
                v = sub.from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CalibConfig(_Config):
    """Stage A–B: SlimSet selection and activation collection.

    Attributes:
        num_prompts: SlimSet size picked from the pool by geometric median + farthest-point sampling.
        num_steps: denoising steps of the calibration sampler (DDIM).
        num_bins: timestep bins the correlations are kept in (``num_bins == num_steps`` keeps every step).
        guidance_scale: classifier-free guidance; both branches run and both feed the statistics.
        batch_size: prompts per UNet call (the UNet sees ``2 * batch_size`` samples with CFG).
        height, width: image size in pixels; ``None`` uses the model's default.
        seed: seed of prompt ``i`` is ``seed + i`` (initial latents).
        prompts_file: one prompt per line; ``None`` uses the pool shipped with slimexport.
        offload: move finished statistics to CPU memory (bounded GPU memory at full SD size).
    """

    num_prompts: int = 500
    num_steps: int = 25
    num_bins: int = 5
    guidance_scale: float = 7.5
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    seed: int = 0
    prompts_file: str | None = None
    offload: bool = False

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "num_prompts", self.num_prompts, _is_int(self.num_prompts) and self.num_prompts >= 1, "an integer >= 1")
        _check(n, "num_steps", self.num_steps, _is_int(self.num_steps) and 1 <= self.num_steps <= 1000, "an integer in [1, 1000]")
        _check(
            n, "num_bins", self.num_bins,
            _is_int(self.num_bins) and 1 <= self.num_bins <= (self.num_steps if _is_int(self.num_steps) else 1),
            f"an integer in [1, num_steps={self.num_steps}]",
        )
        _check(n, "guidance_scale", self.guidance_scale, _is_num(self.guidance_scale) and self.guidance_scale >= 1.0, "a number >= 1 (1 disables CFG)")
        _check(n, "batch_size", self.batch_size, _is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1")
        for k in ("height", "width"):
            v = getattr(self, k)
            _check(n, k, v, v is None or (_is_int(v) and v >= 8 and v % 8 == 0), "None or a positive multiple of 8 (pixels)")
        _check(n, "seed", self.seed, _is_int(self.seed) and self.seed >= 0, "an integer >= 0")

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class DecomposeConfig(_Config):
    """Stage C–D: timestep weighting and closed-form decompositions.

    Attributes:
        timestep_weighting: ``spectral`` (SIS-weighted bins) or ``uniform`` (the ablation).
        ridge: relative ridge δ: ``C ← C + δ·(tr C / n)·I`` before factorising.
        ffn_selection: ``cpqr`` (pivoted Cholesky = column-pivoted QR), ``leverage`` (ridge leverage scores),
            ``weight`` (down-projection column norms, no activations: a baseline), ``random`` (a baseline).
        qkvo_method: ``whiten`` (activation-whitened SVD), ``weight`` (plain weight SVD: a baseline),
            ``random`` (random orthogonal subspace: a baseline).
        seed: for the ``random`` baselines.
    """

    timestep_weighting: str = "spectral"
    ridge: float = 1e-4
    ffn_selection: str = "cpqr"
    qkvo_method: str = "whiten"
    seed: int = 0

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "timestep_weighting", self.timestep_weighting, self.timestep_weighting in TIMESTEP_WEIGHTINGS, " or ".join(TIMESTEP_WEIGHTINGS))
        _check(n, "ridge", self.ridge, _is_num(self.ridge) and 0 < self.ridge < 1, "a number in (0, 1)")
        _check(n, "ffn_selection", self.ffn_selection, self.ffn_selection in FFN_SELECTIONS, " or ".join(FFN_SELECTIONS))
        _check(n, "qkvo_method", self.qkvo_method, self.qkvo_method in QKVO_METHODS, " or ".join(QKVO_METHODS))
        _check(n, "seed", self.seed, _is_int(self.seed) and self.seed >= 0, "an integer >= 0")


@dataclass(frozen=True)
class AllocConfig(_Config):
    """Stage E: ranks under one parameter budget.

    Attributes:
        budget: fraction of the *targeted* parameters kept, in (0, 1].
        targets: module types compressed: ``attn`` (Q/K/V/O of both attentions), ``ffn``, ``resnet`` (inner
            channels of ResNet blocks, whole GroupNorm groups; beyond the paper).
        temperature: τ of ``softmax(z(s)/τ)`` over z-scored module scores; ``inf`` gives uniform keep ratios.
        method: ``softmax`` (score-driven) or ``uniform`` (the same keep ratio everywhere).
        r_min: smallest per-head attention rank and smallest FFN width (clipped to the module's size).
        attn_quantum: per-head rank step; ``None`` picks 8 for heads of 40+ dims, less for tiny models.
        ffn_quantum: FFN width step; ``None`` picks 64 for 1024+ wide FFNs, less for tiny models.
        propagation: multiply scores by each module's relative output energy (the method's optional g_m).
        scope: what ``budget`` is a fraction of: ``targeted`` parameters (the paper's reading) or the whole
            ``unet`` (the targeted modules then absorb the whole cut).
    """

    budget: float = 0.73
    targets: tuple[str, ...] = DEFAULT_TARGETS
    temperature: float = 1.0
    method: str = "softmax"
    r_min: int = 8
    attn_quantum: int | None = None
    ffn_quantum: int | None = None
    propagation: bool = False
    scope: str = "targeted"

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "scope", self.scope, self.scope in BUDGET_SCOPES, " or ".join(BUDGET_SCOPES))
        _check(n, "budget", self.budget, _is_num(self.budget) and 0 < self.budget <= 1, "a number in (0, 1], e.g. 0.73")
        t = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets
        _check(
            n, "targets", self.targets,
            isinstance(t, tuple) and len(t) > 0 and len(set(t)) == len(t) and all(x in TARGETS for x in t),
            f"a non-empty subset of {','.join(TARGETS)}",
        )
        object.__setattr__(self, "targets", tuple(x for x in TARGETS if x in t))
        temp_ok = isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool) and self.temperature > 0
        _check(n, "temperature", self.temperature, temp_ok and not math.isnan(self.temperature), "a number > 0 (inf = uniform)")
        _check(n, "method", self.method, self.method in ALLOCATIONS, " or ".join(ALLOCATIONS))
        _check(n, "r_min", self.r_min, _is_int(self.r_min) and self.r_min >= 1, "an integer >= 1")
        for k in ("attn_quantum", "ffn_quantum"):
            v = getattr(self, k)
            _check(n, k, v, v is None or (_is_int(v) and v >= 1), "None (auto) or an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if math.isinf(self.temperature):
            d["temperature"] = "inf"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        if data.get("temperature") == "inf":
            data["temperature"] = math.inf
        return super().from_dict(data)


@dataclass(frozen=True)
class CompressConfig(_Config):
    """The whole compressor: model → calibration → decomposition → allocation → slim UNet."""

    _nested: ClassVar[dict[str, type]] = {"calib": CalibConfig, "decompose": DecomposeConfig, "alloc": AllocConfig}

    model: str = "digits"
    random_weights: bool = False
    device: str = "auto"
    calib_dtype: str = "auto"
    calib: CalibConfig = field(default_factory=CalibConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    alloc: AllocConfig = field(default_factory=AllocConfig)

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "model", self.model, isinstance(self.model, str) and self.model.strip() != "", "a registry name, a local folder or a hub id")
        _check(n, "device", self.device, isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda")), "auto, cpu or cuda[:N]")
        _check(n, "calib_dtype", self.calib_dtype, self.calib_dtype in ("auto",) + DTYPES, "auto, fp32, fp16 or bf16")


@dataclass(frozen=True)
class ExportConfig(_Config):
    """ONNX export of dense and slim UNets."""

    opset: int = 19
    dtype: str = "fp32"
    output_name: str = "latent"
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "opset", self.opset, _is_int(self.opset) and 17 <= self.opset <= 21, "an integer in [17, 21]")
        _check(n, "dtype", self.dtype, self.dtype in ("fp32", "fp16"), "fp32 or fp16")
        _check(n, "output_name", self.output_name, self.output_name in ("latent", "out_sample"), "latent (TensorRT demo) or out_sample (Optimum)")
        for k in ("height", "width"):
            v = getattr(self, k)
            _check(n, k, v, v is None or (_is_int(v) and v >= 8 and v % 8 == 0), "None or a positive multiple of 8 (pixels)")
