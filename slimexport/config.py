"""Stage configs: frozen dataclasses, validated on construction, with a versioned dict round-trip.

Each stage takes exactly one config; ``BuildConfig`` nests them. ``from_dict`` rejects unknown keys so a
typo in a config file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from slimexport.errors import ConfigError, UsageError

CONFIG_VERSION = 1

TARGETS = ("attn", "ffn", "resnet", "proj")
DEFAULT_TARGETS = ("attn", "ffn")
TIMESTEP_WEIGHTINGS = ("spectral", "uniform")
FFN_SELECTIONS = ("cpqr", "leverage", "weight", "random")
QKVO_METHODS = ("whiten", "weight", "random")
ALLOCATIONS = ("softmax", "uniform", "greedy")
DTYPES = ("fp32", "fp16", "bf16")
BACKENDS = ("onnxruntime", "tensorrt", "torch", "aoti", "torch-compile", "openvino")
BUDGET_SCOPES = ("targeted", "unet")
BUDGET_METRICS = ("params", "macs", "latency")


def _check(cls: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(cls, name, value, allowed)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_device(v, allowed=("auto", "cpu")) -> bool:
    """``auto``/``cpu`` (as allowed), ``cuda`` or ``cuda:N``: what ``torch.device`` accepts, checked before it runs."""
    return isinstance(v, str) and (v in allowed or re.fullmatch(r"cuda(:\d+)?", v) is not None)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_nested(n: str, cfg) -> None:
    """Each nested stage config is an instance of its class (a config file may hold a number where an object belongs)."""
    for name, sub in cfg._nested.items():
        v = getattr(cfg, name)
        _check(n, name, v, isinstance(v, sub), f"an instance of {sub.__name__} (in a config file: a JSON object of {sub.__name__} fields)")


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
        _check(n, "prompts_file", self.prompts_file, self.prompts_file is None or (isinstance(self.prompts_file, str) and self.prompts_file != ""),
               "None or the path of a text file (one prompt per line)")
        _check(n, "offload", self.offload, isinstance(self.offload, bool), "true or false")

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
            channels of ResNet blocks, whole GroupNorm groups; beyond the paper), ``proj`` (each transformer's
            ``proj_in``/``proj_out`` factored to rank r by whitened SVD; beyond the paper).
        temperature: τ of ``softmax(z(s)/τ)`` over z-scored module scores; ``inf`` gives uniform keep ratios.
        method: ``greedy`` (error-aware: minimises the energy-weighted whitened errors under the budget; beyond the
            paper; the default: the most faithful at equal parameters and equal measured speed on ``digits``, README
            "Defaults"), ``softmax`` (score-driven, the paper's; ``--preset paper``) or ``uniform`` (the same keep
            ratio everywhere).
        r_min: smallest per-head attention rank and smallest FFN width (clipped to the module's size).
        attn_quantum: per-head rank step; ``None`` picks 8 for heads of 40+ dims, less for tiny models.
        ffn_quantum: FFN width step; ``None`` picks 64 for 1024+ wide FFNs, less for tiny models.
        propagation: multiply scores by each module's relative output energy (the method's optional g_m).
        scope: what ``budget`` is a fraction of: ``targeted`` parameters (the paper's reading) or the whole
            ``unet`` (the targeted modules then absorb the whole cut).
        metric: what the budget counts: ``params`` (the paper), ``macs`` (multiply-accumulates of one forward
            at the calibration size: a cost closer to latency) or ``latency`` (engine time measured per module and
            rank level on the build's backend and shape, ``slimexport.latency``: the budget is then a fraction of
            the dense UNet's engine latency, whatever ``scope`` says; the targeted modules absorb the whole cut).
    """

    budget: float = 0.73
    targets: tuple[str, ...] = DEFAULT_TARGETS
    temperature: float = 1.0
    method: str = "greedy"
    r_min: int = 8
    attn_quantum: int | None = None
    ffn_quantum: int | None = None
    propagation: bool = False
    scope: str = "targeted"
    metric: str = "params"

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "scope", self.scope, self.scope in BUDGET_SCOPES, " or ".join(BUDGET_SCOPES))
        _check(n, "metric", self.metric, self.metric in BUDGET_METRICS, " or ".join(BUDGET_METRICS))
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
        _check(n, "propagation", self.propagation, isinstance(self.propagation, bool), "true or false")

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
    config_of: str | None = None  # registry architecture of a single-file checkpoint; None: detected from its keys

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "model", self.model, isinstance(self.model, str) and self.model.strip() != "",
               "a registry name, a local folder, a .safetensors checkpoint or a hub id")
        if self.config_of is not None:  # torch is imported only when the field is set
            from slimexport.models.registry import checkpoint_configs

            usable = checkpoint_configs()
            _check(n, "config_of", self.config_of, self.config_of in usable and self.random_weights is False,
                   f"None or one of {', '.join(usable)}, for a single-file checkpoint (not with random_weights)")
        _check(n, "device", self.device, _is_device(self.device), "auto, cpu or cuda[:N]")
        _check(n, "calib_dtype", self.calib_dtype, self.calib_dtype in ("auto",) + DTYPES, "auto, fp32, fp16 or bf16")
        _check(n, "random_weights", self.random_weights, isinstance(self.random_weights, bool), "true or false")
        _check_nested(n, self)


@dataclass(frozen=True)
class ExportConfig(_Config):
    """ONNX export of dense and slim UNets. ``dtype``: ``fp32``, ``fp16``, or ``bf16`` (an fp32 ONNX that the
    openvino engine computes in bf16; the only backend that runs bf16)."""

    opset: int = 19
    dtype: str = "fp32"
    output_name: str = "latent"
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "opset", self.opset, _is_int(self.opset) and 17 <= self.opset <= 21, "an integer in [17, 21]")
        _check(n, "dtype", self.dtype, self.dtype in DTYPES, "fp32, fp16 or bf16 (bf16: backend openvino only)")
        _check(n, "output_name", self.output_name, self.output_name in ("latent", "out_sample"), "latent (TensorRT demo) or out_sample (Optimum)")
        for k in ("height", "width"):
            v = getattr(self, k)
            _check(n, k, v, v is None or (_is_int(v) and v >= 8 and v % 8 == 0), "None or a positive multiple of 8 (pixels)")


def _triple(n: str, name: str, v, minimum: int) -> None:
    ok = (isinstance(v, tuple) and len(v) == 3 and all(_is_int(x) and x >= minimum for x in v) and v[0] <= v[1] <= v[2])
    _check(n, name, v, ok, f"min,opt,max integers >= {minimum} with min <= opt <= max")


MAX_VERIFY_PROMPTS = 16  # fixed inputs of the parity checks: 2 × this many UNet rows at most


@dataclass(frozen=True)
class VerifyConfig(_Config):
    """Parity and fidelity gates of ``slimexport verify`` (and ``build``).

    Attributes:
        timesteps: timesteps of the fixed ε-prediction inputs.
        num_prompts: prompts in the fixed inputs (each with its unconditional twin: batch ``2 × num_prompts``).
        trajectory_steps: DDIM steps of the fixed-seed trajectory compared slim vs dense.
        guidance_scale: CFG scale of that trajectory.
        seed: seed of the fixed inputs.
        atol, rtol, min_cosine: override the export-parity gate (``None``: per-dtype defaults, see
            ``slimexport.verify.metrics.DEFAULT_TOLERANCES``).
        max_eps_error: slim-vs-dense gate: largest mean relative ε error ``‖ε_s − ε_d‖ / ‖ε_d‖`` over timesteps.
        min_latent_cosine: slim-vs-dense gate: smallest cosine of the final latents of the trajectory.
            ``None`` (both): the measured defaults for the model (``slimexport.verify.parity.default_gate``: tight
            for trained weights, loose for random ones).
    """

    timesteps: tuple[float, ...] = (999.0, 750.0, 500.0, 250.0, 50.0)
    num_prompts: int = 2
    trajectory_steps: int = 10
    guidance_scale: float = 5.0
    seed: int = 0
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    max_eps_error: float | None = None
    min_latent_cosine: float | None = None

    def __post_init__(self):
        n = type(self).__name__
        ts = tuple(self.timesteps) if isinstance(self.timesteps, (list, tuple)) else self.timesteps
        _check(n, "timesteps", self.timesteps, isinstance(ts, tuple) and len(ts) > 0 and all(_is_num(t) and 0 <= t < 1000 for t in ts),
               "a non-empty list of timesteps in [0, 1000)")
        object.__setattr__(self, "timesteps", tuple(float(t) for t in ts))
        _check(n, "num_prompts", self.num_prompts, _is_int(self.num_prompts) and 1 <= self.num_prompts <= MAX_VERIFY_PROMPTS,
               f"an integer in [1, {MAX_VERIFY_PROMPTS}]")
        _check(n, "trajectory_steps", self.trajectory_steps, _is_int(self.trajectory_steps) and 1 <= self.trajectory_steps <= 200,
               "an integer in [1, 200]")
        _check(n, "guidance_scale", self.guidance_scale, _is_num(self.guidance_scale) and self.guidance_scale >= 1, "a number >= 1")
        for k in ("atol", "rtol"):
            v = getattr(self, k)
            _check(n, k, v, v is None or (_is_num(v) and v >= 0), "None or a number >= 0")
        _check(n, "min_cosine", self.min_cosine, self.min_cosine is None or (_is_num(self.min_cosine) and -1 <= self.min_cosine <= 1),
               "None or a number in [-1, 1]")
        _check(n, "max_eps_error", self.max_eps_error,
               self.max_eps_error is None or (_is_num(self.max_eps_error) and self.max_eps_error > 0), "None or a number > 0")
        _check(n, "min_latent_cosine", self.min_latent_cosine,
               self.min_latent_cosine is None or (_is_num(self.min_latent_cosine) and -1 <= self.min_latent_cosine <= 1),
               "None or a number in [-1, 1]")


@dataclass(frozen=True)
class BenchConfig(_Config):
    """Dense-vs-slim timing of ``slimexport bench`` (and ``build``).

    Attributes:
        iterations: timed calls per model, exactly; ``None``: timed by a budget: at least 100 on GPU, 20 on CPU,
            then more until the speed-up's 95% interval is within ``target_ci`` of it or ``max_seconds`` pass.
        warmup: untimed calls per model first.
        target_ci: with ``iterations=None``, the largest half-width of the speed-up's 95% interval, relative to
            the speed-up, that ends timing.
        max_seconds: with ``iterations=None``, the most seconds of timed calls (both models together).
        batch: UNet batch (``2B``) timed; ``None``: the profile's optimum.
        height, width: latent cells timed; ``None``: the profile's optimum.
    """

    iterations: int | None = None
    warmup: int = 5
    target_ci: float = 0.02
    max_seconds: float = 30.0
    batch: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "iterations", self.iterations, self.iterations is None or (_is_int(self.iterations) and self.iterations >= 1),
               "None or an integer >= 1")
        _check(n, "warmup", self.warmup, _is_int(self.warmup) and self.warmup >= 0, "an integer >= 0")
        _check(n, "target_ci", self.target_ci, _is_num(self.target_ci) and 0 < self.target_ci < 1, "a number in (0, 1)")
        _check(n, "max_seconds", self.max_seconds, _is_num(self.max_seconds) and 0 < self.max_seconds <= 3600,
               "a number of seconds in (0, 3600]")
        for k in ("batch", "height", "width"):
            v = getattr(self, k)
            _check(n, k, v, v is None or (_is_int(v) and v >= 1), "None or an integer >= 1")


CACHE_MODES = ("auto", "off")
DEFAULT_CACHE_STEPS = (10, 25, 50)  # step counts whose schedules a build writes (the 10/25/50 DDIM steps)


def parse_cache_mode(text: str | int) -> str | int:
    """``--cache`` as typed (``auto``, ``off`` or an interval ``N``) -> ``CacheConfig.mode``; validation is the config's."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in CACHE_MODES:
        return s
    try:
        return int(s)
    except ValueError:
        raise UsageError(f"--cache {text!r} is not auto, off or an interval", "pass --cache auto, --cache off or --cache N "
                         "(N >= 1: the full UNet every N-th step)") from None


@dataclass(frozen=True)
class CacheConfig(_Config):
    """Step caching: which steps reuse the deep UNet features of the last full step.

    Attributes:
        mode: ``off``; ``auto`` (full steps where the measured feature change calls for them); or an integer
            interval N >= 1 (the full UNet at every N-th step, the shallow path in between; 1 = every step full).
        depth: blocks kept at each end of the shallow path, 1..number of down blocks (checked against the UNet
            when it is split): 1 is the shallowest and fastest.
        threshold: ``auto``: the largest predicted accumulated relative change of the cached feature a shallow
            step may reuse (0.3: a 30% drift of the deep feature since the last full step).
        max_interval: ``auto``: at most this many steps from one full step to the next.
        steps: the step counts whose schedules ``schedule.json`` lists (any other count is derived at run time).
        measure_prompts: ``auto``: calibration prompts the feature change is measured on (the first of the SlimSet).
        eps_error: ``auto``: also measure the one-step cache error of the UNet's output (one shallow pass per depth
            per measured step; reported, not used by the rule).
    """

    mode: str | int = "off"
    depth: int = 1
    threshold: float = 0.3
    max_interval: int = 10
    steps: tuple[int, ...] = DEFAULT_CACHE_STEPS
    measure_prompts: int = 8
    eps_error: bool = True

    def __post_init__(self):
        n = type(self).__name__
        m = self.mode
        _check(n, "mode", m, m in CACHE_MODES or (_is_int(m) and m >= 1),
               "'auto', 'off' or a cache interval N >= 1 (the full UNet every N-th step; 1: every step)")
        _check(n, "depth", self.depth, _is_int(self.depth) and self.depth >= 1,
               "an integer >= 1 (blocks kept at each end of the shallow path; at most the UNet's down blocks)")
        _check(n, "threshold", self.threshold, _is_num(self.threshold) and self.threshold > 0, "a number > 0")
        _check(n, "max_interval", self.max_interval, _is_int(self.max_interval) and self.max_interval >= 1, "an integer >= 1")
        _check(n, "steps", self.steps, isinstance(self.steps, tuple) and len(self.steps) >= 1
               and all(_is_int(s) and s >= 1 for s in self.steps), "a non-empty tuple of step counts >= 1")
        _check(n, "measure_prompts", self.measure_prompts, _is_int(self.measure_prompts) and self.measure_prompts >= 1,
               "an integer >= 1")
        _check(n, "eps_error", self.eps_error, isinstance(self.eps_error, bool), "true or false")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def interval(self) -> int | None:
        return self.mode if _is_int(self.mode) else None

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        rule = f"interval {self.mode}" if self.interval else f"auto (threshold {self.threshold:g}, max interval {self.max_interval})"
        return f"{rule}, depth {self.depth}"


@dataclass(frozen=True)
class BuildConfig(_Config):
    """``slimexport build``: compress → export → engine → verify → bench.

    Attributes:
        compress, export, verify, bench: the stage configs.
        backend: ``onnxruntime``, ``tensorrt``, ``torch``, ``aoti`` (AOTInductor packages), ``torch-compile`` or
            ``openvino`` (OpenVINO on the CPU; the only backend for ``export.dtype`` bf16).
        engine_device: where engines run: ``auto`` (CUDA if the backend can use it, else CPU), ``cpu``, ``cuda``.
        batch: ``(min, opt, max)`` prompts per call of the engine profile (the UNet sees twice as many rows: CFG).
        height, width: ``(min, opt, max)`` image size in pixels; ``None``: half, one and one and a half times the
            model's default size (rounded to what the UNet accepts).
        optimization_level: TensorRT builder optimization level.
        pipeline: write ``pipeline/``, the whole pipeline as ONNX in the layout diffusers' and Optimum's ONNX
            pipelines load, with the slim UNet; ``None``: where the model was read from a pipeline folder or the hub
            (trained weights with a text encoder and a VAE).
        cache: step caching (``--cache auto|off|N``): a full/shallow engine pair per UNet and ``schedule.json``.
        figures: draw ``figures/`` (sample images, ε error per timestep, ranks, latency) for the report; ``False``
            skips the trajectories they sample (minutes at SD sizes on a CPU).
    """

    _nested: ClassVar[dict[str, type]] = {"compress": CompressConfig, "export": ExportConfig, "verify": VerifyConfig,
                                          "bench": BenchConfig, "cache": CacheConfig}

    compress: CompressConfig = field(default_factory=CompressConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    backend: str = "onnxruntime"
    engine_device: str = "auto"
    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] | None = None
    width: tuple[int, int, int] | None = None
    optimization_level: int = 3
    pipeline: bool | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    figures: bool = True

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "backend", self.backend, self.backend in BACKENDS, " or ".join(BACKENDS))
        _check(n, "pipeline", self.pipeline, self.pipeline in (None, True, False), "None, True or False")
        _check(n, "figures", self.figures, self.figures in (True, False), "True or False")
        _check(n, "engine_device", self.engine_device, _is_device(self.engine_device),
               "auto, cpu or cuda[:N]")
        for k, lo in (("batch", 1), ("height", 8), ("width", 8)):
            v = getattr(self, k)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, k, v)
            if v is not None or k == "batch":
                _triple(n, k, v, lo)
        _check(n, "optimization_level", self.optimization_level, _is_int(self.optimization_level) and 0 <= self.optimization_level <= 5,
               "an integer in [0, 5]")
        _check_nested(n, self)
        _check(n, "backend", self.backend, self.export.dtype != "bf16" or self.backend == "openvino",
               "openvino with dtype bf16 (only OpenVINO runs bf16; other backends take fp32 or fp16)")
        if self.backend == "openvino":
            _check(n, "engine_device", self.engine_device, self.engine_device in ("auto", "cpu"),
                   "auto or cpu with backend openvino (OpenVINO runs on the CPU)")
