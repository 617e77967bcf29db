"""The engine interface: one ``run(feeds) -> outputs`` for every backend, shape profiles, and the registry.

An *engine* runs a UNet with the TensorRT demo's I/O (``sample``, ``timestep``, ``encoder_hidden_states`` →
``latent``) on numpy arrays, whatever executes it (PyTorch, ONNX Runtime, TensorRT). The same feeds go to the
dense and the slim engine, and to the torch reference, so parity and speed compare like with like.

Units used throughout: ``batch`` is the leading dimension of ``sample`` (``2B`` with classifier-free guidance:
two rows per prompt), ``height``/``width`` are latent cells (pixels / VAE scale factor, 8 for SD).
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from slimexport.config import _check, _Config, _is_device, _is_int
from slimexport.errors import IncompatibleArtifactError, UsageError

SAMPLE = "sample"
TIMESTEP = "timestep"
CONTEXT = "encoder_hidden_states"
INPUT_NAMES = (SAMPLE, TIMESTEP, CONTEXT)
OUTPUT_NAMES = ("latent", "out_sample")  # TensorRT demo, Hugging Face Optimum
BATCH_AXIS, HEIGHT_AXIS, WIDTH_AXIS = "2B", "H", "W"
TIMESTEP_AXIS = "Bt"  # the exported timestep's own axis: 1 (broadcast to every row) or 2B
TIMESTEP_DTYPES = ("float32", "sample")  # the timestep input's dtype: float32, or the sample's
NUM_TRAIN_TIMESTEPS = 1000  # SD's training schedule: timesteps live in [0, 1000)

NP_DTYPES = {"fp32": "float32", "fp16": "float16"}
BF16_BACKENDS = ("openvino",)  # bf16 engines: computed from the fp32 export, float32 I/O


def unet_io_spec(*, dtype: str, output_name: str, in_channels: int, out_channels: int, seq_len: int,
                 context_dim: int, broadcast_timestep: bool = False, timestep_dtype: str = "float32") -> dict:
    """The I/O spec recorded in export results and manifests.

    Shapes use the axis names ``2B``, ``H``, ``W`` for dynamic dimensions and integers for static ones.
    ``timestep`` is float32 by default (fp16 cannot hold fractional timesteps near 1000). Its shape is ``[2B]``,
    or with ``broadcast_timestep`` (what the ONNX export does) ``[Bt]``, an axis of its own that is 1 (one
    timestep for every row, as diffusers' ONNX pipelines and the TensorRT demo pass it) or 2B; the entry then
    says so: ``"sizes": {"Bt": [1, "2B"]}``. Every engine accepts both (see :func:`check_feeds`).

    Args:
        timestep_dtype: ``float32``, or ``sample``: the sample's dtype (float16 for fp16).

    Returns:
        ``{"inputs": [{"name", "dtype", "shape"}...], "outputs": [...], "dynamic_axes": {name: {label: axis}}}``
        (keyed by label, e.g. ``{"sample": {"2B": 0, "H": 2, "W": 3}}``, so it survives a JSON round trip).
    """
    if dtype not in NP_DTYPES:
        raise UsageError(f"dtype={dtype!r} is not supported for UNet I/O", "use fp32 or fp16")
    if output_name not in OUTPUT_NAMES:
        raise UsageError(f"output_name={output_name!r} is not supported", f"use one of {', '.join(OUTPUT_NAMES)}")
    if timestep_dtype not in TIMESTEP_DTYPES:
        raise UsageError(f"timestep_dtype={timestep_dtype!r} is not supported", f"use one of {', '.join(TIMESTEP_DTYPES)}")
    act = NP_DTYPES[dtype]
    timestep = {"name": TIMESTEP, "dtype": act if timestep_dtype == "sample" else "float32", "shape": [BATCH_AXIS]}
    if broadcast_timestep:
        timestep.update(shape=[TIMESTEP_AXIS], sizes={TIMESTEP_AXIS: [1, BATCH_AXIS]})
    inputs = [
        {"name": SAMPLE, "dtype": act, "shape": [BATCH_AXIS, in_channels, HEIGHT_AXIS, WIDTH_AXIS]},
        timestep,
        {"name": CONTEXT, "dtype": act, "shape": [BATCH_AXIS, seq_len, context_dim]},
    ]
    outputs = [{"name": output_name, "dtype": act, "shape": [BATCH_AXIS, out_channels, HEIGHT_AXIS, WIDTH_AXIS]}]
    dynamic_axes = {
        e["name"]: {d: i for i, d in enumerate(e["shape"]) if isinstance(d, str)} for e in inputs + outputs
    }
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": dynamic_axes}


def io_spec_for_unet(unet, *, dtype: str = "fp32", output_name: str = "latent", seq_len: int = 77,
                     broadcast_timestep: bool = False, timestep_dtype: str = "float32") -> dict:
    """:func:`unet_io_spec` read off a diffusers ``UNet2DConditionModel``'s config."""
    from slimexport.models.arch import context_dim  # torch: not at import time (the lean-import rule)

    cfg = unet.config
    return unet_io_spec(dtype=dtype, output_name=output_name, in_channels=int(cfg.in_channels),
                        out_channels=int(cfg.out_channels), seq_len=seq_len, context_dim=context_dim(cfg),
                        broadcast_timestep=broadcast_timestep, timestep_dtype=timestep_dtype)


def make_feeds(io_spec: dict, batch: int, height: int, width: int, seed: int = 0,
               one_timestep: bool = False) -> dict[str, np.ndarray]:
    """Seeded random inputs matching ``io_spec``: ``sample`` and ``encoder_hidden_states`` ~ N(0, 1), timesteps
    spread over [0, 999] (fractional, as samplers produce them), in the timestep's dtype.

    Args:
        batch: the ``2B`` axis; height, width: latent cells.
        one_timestep: ``timestep`` of shape ``[1]`` (one for every row) instead of one per row.
    """
    rng = np.random.default_rng(seed)
    dims = {BATCH_AXIS: batch, HEIGHT_AXIS: height, WIDTH_AXIS: width, TIMESTEP_AXIS: batch}
    feeds = {}
    for entry in io_spec["inputs"]:
        shape = [dims[d] if isinstance(d, str) else int(d) for d in entry["shape"]]
        if entry["name"] == TIMESTEP:
            shape = [1] if one_timestep else shape
            feeds[TIMESTEP] = rng.uniform(0, NUM_TRAIN_TIMESTEPS - 1, size=shape).astype(entry["dtype"])
        else:
            feeds[entry["name"]] = rng.standard_normal(shape).astype(entry["dtype"])
    return feeds


def _timestep_dtypes(io_spec: dict) -> list[str]:
    """The timestep dtypes engines take: the graph's, float32 and the sample's (converted to the graph's)."""
    types = {e["name"]: e["dtype"] for e in io_spec["inputs"]}
    return list(dict.fromkeys([types[TIMESTEP], "float32", types.get(SAMPLE, "float32")]))


def check_feeds(io_spec: dict, feeds: Mapping[str, np.ndarray]) -> None:
    """Refuse feeds whose names, dtypes, ranks or static sizes differ from ``io_spec``, or whose ``2B``/``H``/``W``
    sizes disagree between inputs, with a one-line :class:`UsageError`.

    ``timestep`` may be ``[1]`` (one timestep for every row) or ``[2B]``, in float32 or the sample's dtype,
    whatever the graph declares: :func:`conform_feeds` converts it."""
    names = [e["name"] for e in io_spec["inputs"]]
    missing = [n for n in names if n not in feeds]
    extra = sorted(set(feeds) - set(names))
    if missing or extra:
        raise UsageError(f"engine inputs are {', '.join(names)}; got {', '.join(sorted(feeds)) or 'none'}",
                         "pass exactly the engine's input names")
    seen: dict[str, tuple[int, str]] = {}
    for entry in io_spec["inputs"]:
        name, arr = entry["name"], feeds[entry["name"]]
        if name == TIMESTEP:
            continue  # below: its size depends on 2B
        if str(arr.dtype) != entry["dtype"]:
            raise UsageError(f"input {name} has dtype {arr.dtype}, the engine takes {entry['dtype']}",
                             f"cast it with .astype(np.{entry['dtype']})")
        if arr.ndim != len(entry["shape"]):
            raise UsageError(f"input {name} has shape {list(arr.shape)}, the engine takes rank {len(entry['shape'])} "
                             f"({entry['shape']})", "reshape the input")
        for axis, (want, got) in enumerate(zip(entry["shape"], arr.shape)):
            if isinstance(want, str):
                if want in seen and seen[want][0] != got:
                    raise UsageError(f"axis {want} is {seen[want][0]} in {seen[want][1]} but {got} in {name}",
                                     "give every input the same batch (2B) size")
                seen.setdefault(want, (int(got), name))
            elif int(want) != got:
                raise UsageError(f"input {name} has size {got} on axis {axis}, the engine takes {want}",
                                 f"pass shape {entry['shape']}")
    if TIMESTEP in names:
        arr, ok = feeds[TIMESTEP], _timestep_dtypes(io_spec)
        if str(arr.dtype) not in ok:
            raise UsageError(f"input {TIMESTEP} has dtype {arr.dtype}, the engine takes {' or '.join(ok)}",
                             f"cast it with .astype(np.{ok[0]})")
        rows = seen.get(BATCH_AXIS, (None,))[0]
        if arr.ndim != 1 or arr.shape[0] not in (1, rows):
            raise UsageError(f"input {TIMESTEP} has shape {list(arr.shape)}, the engine takes [1] (one timestep for every "
                             f"row) or [2B] = [{rows}]", "pass one timestep, or one per sample row")


def conform_feeds(io_spec: dict, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds :func:`check_feeds` accepted, as the graph takes them: ``timestep`` cast to its declared dtype, and
    a ``[1]`` timestep repeated to ``[2B]`` where the graph ties its axis to the batch (``[2B]``)."""
    out = dict(feeds)
    entry = next((e for e in io_spec["inputs"] if e["name"] == TIMESTEP), None)
    if entry is None or TIMESTEP not in out:
        return out
    t = out[TIMESTEP].astype(entry["dtype"], copy=False)
    rows = int(out[SAMPLE].shape[0]) if SAMPLE in out else t.shape[0]
    if entry["shape"][0] == BATCH_AXIS and t.shape[0] == 1 and rows != 1:
        t = np.repeat(t, rows)
    out[TIMESTEP] = t
    return out


@dataclass(frozen=True)
class EngineProfile(_Config):
    """The range of input shapes an engine accepts (a TensorRT optimization profile), recorded in manifests.

    Attributes:
        min_batch, opt_batch, max_batch: the ``2B`` axis (UNet rows: two per prompt with CFG).
        min_height, opt_height, max_height, min_width, opt_width, max_width: latent cells.
        latent_multiple: heights and widths must be multiples of this: the UNet's total downsampling factor
            (``slimexport.models.arch.latent_multiple``: 8 for SD1.x/2.x), so skip connections line up.
    """

    min_batch: int = 1
    opt_batch: int = 2
    max_batch: int = 4
    min_height: int = 32
    opt_height: int = 64
    max_height: int = 96
    min_width: int = 32
    opt_width: int = 64
    max_width: int = 96
    latent_multiple: int = 8

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "latent_multiple", self.latent_multiple, _is_int(self.latent_multiple) and self.latent_multiple >= 1,
               "an integer >= 1")
        for axis in ("batch", "height", "width"):
            lo, opt, hi = (getattr(self, f"{k}_{axis}") for k in ("min", "opt", "max"))
            for k, v in (("min", lo), ("opt", opt), ("max", hi)):
                _check(n, f"{k}_{axis}", v, _is_int(v) and v >= 1, "an integer >= 1")
                if axis != "batch":
                    m = self.latent_multiple
                    _check(n, f"{k}_{axis}", v, v % m == 0, f"a multiple of latent_multiple={m} (latent cells)")
            _check(n, f"opt_{axis}", opt, lo <= opt <= hi, f"min_{axis} <= opt_{axis} <= max_{axis} ({lo} <= {opt} <= {hi})")

    @classmethod
    def static(cls, batch: int, height: int, width: int, latent_multiple: int = 8) -> EngineProfile:
        """A profile of one shape (what CUDA graphs and the fastest TensorRT engines want)."""
        return cls(batch, batch, batch, height, height, height, width, width, width, latent_multiple)

    @classmethod
    def from_pixels(cls, *, batch: tuple[int, int, int], height: tuple[int, int, int], width: tuple[int, int, int],
                    vae_scale_factor: int = 8, cfg: bool = True, latent_multiple: int = 8) -> EngineProfile:
        """Build a profile from what users type: prompts per call and image sizes in pixels.

        Args:
            batch: (min, opt, max) prompts per call; doubled when ``cfg`` (two UNet rows per prompt).
            height, width: (min, opt, max) pixels; divided by ``vae_scale_factor``.
        """
        rows = 2 if cfg else 1
        for name, trip in (("height", height), ("width", width)):
            for v in trip:
                if not _is_int(v) or v % vae_scale_factor:
                    raise UsageError(f"{name} {v} px is not a multiple of the VAE scale factor {vae_scale_factor}",
                                     f"pass a {name} that is a multiple of {vae_scale_factor * latent_multiple}")
                if (v // vae_scale_factor) % latent_multiple:
                    raise UsageError(f"{name} {v} px is {v // vae_scale_factor} latent cells, not a multiple of the UNet's "
                                     f"downsampling factor {latent_multiple}",
                                     f"pass a {name} that is a multiple of {vae_scale_factor * latent_multiple}")
        lat = [tuple(v // vae_scale_factor for v in t) for t in (height, width)]
        return cls(*(b * rows for b in batch), *lat[0], *lat[1], latent_multiple=latent_multiple)

    def narrowed_to(self, built: EngineProfile, engine: str, fix: str) -> EngineProfile:
        """This profile limited to the shapes ``built`` accepts (sizes on both profiles' multiples; an engine fails
        deep inside on anything wider). ``engine`` and ``fix`` word the error.

        Raises:
            UsageError: an axis has no size in common.
        """
        m = math.lcm(self.latent_multiple, built.latent_multiple)
        changes: dict[str, int] = {"latent_multiple": m}
        for axis in ("batch", "height", "width"):
            unit = 1 if axis == "batch" else m
            lo = -(-max(getattr(self, f"min_{axis}"), getattr(built, f"min_{axis}")) // unit) * unit
            hi = min(getattr(self, f"max_{axis}"), getattr(built, f"max_{axis}")) // unit * unit
            if lo > hi:
                raise UsageError(f"the {engine} was built for {axis} {getattr(built, f'min_{axis}')}..{getattr(built, f'max_{axis}')}"
                                 f"{'' if unit == 1 else f' (multiples of {built.latent_multiple})'}, the profile asks for "
                                 f"{getattr(self, f'min_{axis}')}..{getattr(self, f'max_{axis}')}"
                                 f"{'' if unit == 1 else f' (multiples of {self.latent_multiple})'}", fix)
            opt = min(max(getattr(self, f"opt_{axis}") // unit * unit, lo), hi)
            changes.update({f"min_{axis}": lo, f"opt_{axis}": opt, f"max_{axis}": hi})
        return self.replace(**changes)

    def describe(self) -> str:
        return (f"batch {self.min_batch}..{self.max_batch}, height {self.min_height}..{self.max_height}, "
                f"width {self.min_width}..{self.max_width} latent cells")

    def check(self, batch: int, height: int, width: int) -> None:
        """Refuse a ``sample`` shape outside the profile with a one-line :class:`UsageError`."""
        problems = []
        for axis, v in (("batch", batch), ("height", height), ("width", width)):
            lo, hi = getattr(self, f"min_{axis}"), getattr(self, f"max_{axis}")
            if v < lo:
                problems.append(f"{axis} {v} < min {lo}")
            elif v > hi:
                problems.append(f"{axis} {v} > max {hi}")
            elif axis != "batch" and v % self.latent_multiple:
                problems.append(f"{axis} {v} is not a multiple of {self.latent_multiple}")
        if problems:
            raise UsageError(
                f"input shape (batch {batch}, {height}x{width} latent) is outside the engine profile: "
                f"{'; '.join(problems)} (profile: {self.describe()})",
                "rebuild the engine with a profile that covers it (--batch/--height/--width MIN,OPT,MAX)",
            )

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        shape = feeds[SAMPLE].shape
        self.check(int(shape[0]), int(shape[2]), int(shape[3]))


@dataclass(frozen=True)
class EngineConfig(_Config):
    """How to build or load an engine (one config for every backend; each reads the fields it needs).

    Attributes:
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads (ONNX Runtime intra-op threads, ``torch.set_num_threads``); ``None``: the cores
            this process may use.
        profile: accepted shapes; TensorRT builds its optimization profile from it, every backend refuses
            inputs outside it. ``None``: any shape the model accepts (not for TensorRT).
        dtype: torch backend: weights and activations, ``fp32`` or ``fp16``; ONNX backends take the ONNX's types;
            ``bf16``: the openvino backend computes the fp32 export in bf16 (other backends refuse it).
        channels_last: torch backend: NHWC memory format (the fast layout for cuDNN convolutions).
        cuda_graphs: torch backend on CUDA: capture one CUDA graph per input shape and replay it.
        providers: onnxruntime: execution providers, e.g. ``("CUDAExecutionProvider",)``; ``None`` picks from
            ``device``.
        optimization_level: TensorRT builder optimization level, 0..5 (3 is TensorRT's default).
        cache_dir: TensorRT: folder of the timing caches; ``None``: beside the engine. aoti: folder of the compiled
            packages (``unet.<device>.torch<ver>.pt2`` + sidecar); ``None``: a per-model folder under
            ``~/.cache/slimexport/aoti``. openvino: OpenVINO's model cache (``CACHE_DIR``); ``None``: none.
        output_name: torch backend: name of the output (``latent`` or ``out_sample``).
        seq_len: torch and aoti backends: text tokens of ``encoder_hidden_states`` (77 for CLIP, 6 for ``digits``;
            the ONNX backends read it off the ONNX).
    """

    device: str = "cpu"
    threads: int | None = None
    profile: EngineProfile | None = None
    dtype: str = "fp32"
    channels_last: bool = False
    cuda_graphs: bool = False
    providers: tuple[str, ...] | None = None
    optimization_level: int = 3
    cache_dir: str | None = None
    output_name: str = "latent"
    seq_len: int = 77

    _nested: ClassVar[dict[str, type]] = {"profile": EngineProfile}

    def __post_init__(self):
        n = type(self).__name__
        _check(n, "device", self.device, _is_device(self.device, allowed=("cpu",)), "cpu, cuda or cuda:N")
        _check(n, "seq_len", self.seq_len, _is_int(self.seq_len) and self.seq_len >= 1, "an integer >= 1")
        _check(n, "threads", self.threads, self.threads is None or (_is_int(self.threads) and self.threads >= 1),
               "None or an integer >= 1")
        _check(n, "profile", self.profile, self.profile is None or isinstance(self.profile, EngineProfile),
               "None or an EngineProfile")
        _check(n, "dtype", self.dtype, self.dtype in NP_DTYPES or self.dtype == "bf16", "fp32, fp16 or bf16 (openvino only)")
        _check(n, "optimization_level", self.optimization_level,
               _is_int(self.optimization_level) and 0 <= self.optimization_level <= 5, "an integer in [0, 5]")
        _check(n, "output_name", self.output_name, self.output_name in OUTPUT_NAMES, " or ".join(OUTPUT_NAMES))
        if self.cuda_graphs:
            _check(n, "cuda_graphs", self.cuda_graphs, self.device.startswith("cuda"), "False on CPU (CUDA graphs need a GPU)")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))


class Engine(ABC):
    """A runnable UNet. Subclasses set ``name``, ``device``, ``io_spec`` and implement :meth:`_run`.

    Attributes:
        name: backend name (``torch``, ``onnxruntime``, ``tensorrt``).
        device: ``cpu`` or ``cuda:N``.
        io_spec: as :func:`unet_io_spec`.
        profile: accepted shapes, or ``None`` for any.
        files: the compiled files it runs from (TensorRT plans, AOTInductor packages, with their sidecars), which a
            build records in its manifest; empty for engines made in memory.
    """

    name: str = "engine"
    device: str = "cpu"
    io_spec: dict
    profile: EngineProfile | None = None
    files: tuple[Path, ...] = ()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on host arrays; returns host arrays keyed by output name.

        Raises:
            UsageError: wrong names, dtypes or ranks, or a shape outside :attr:`profile`.
        """
        return self._run(self.check(feeds))

    def check(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Refuse feeds the engine cannot take (:func:`check_feeds`, :attr:`profile`); returns them as its graph
        takes them (:func:`conform_feeds`: a ``[1]`` or sample-dtype timestep converted)."""
        check_feeds(self.io_spec, feeds)
        if self.profile is not None:
            self.profile.check_feeds(feeds)
        return conform_feeds(self.io_spec, feeds)

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """Stage ``feeds`` once and return a zero-argument call that runs the engine on them (what timing loops
        call). Backends that can keep inputs and outputs on the device override this; the default runs
        :meth:`run` and so includes host transfers."""
        staged = self.check(feeds)
        return lambda: self._run(staged)

    def info(self) -> dict:
        """Backend, device, threads and versions, for manifests and benchmark reports."""
        return {"backend": self.name, "device": self.device}

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release sessions and device memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


BACKENDS: dict[str, str] = {
    "torch": "slimexport.engines.torch_runner:create",
    "onnxruntime": "slimexport.engines.onnxruntime:create",
    "tensorrt": "slimexport.engines.tensorrt:create",
    "aoti": "slimexport.engines.aoti:create",
    "torch-compile": "slimexport.engines.torch_compile:create",
    "openvino": "slimexport.engines.openvino:create",
}


def unet_from_source(source, backend: str, accepts: str = "a UNet module or a slim UNet folder"):
    """The UNet a PyTorch-based backend starts from: a module as given, or the slim UNet in a folder.

    Raises:
        UsageError: ``source`` is neither (``accepts`` says what the backend takes).
    """
    import torch.nn as nn

    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if (path / "slim_plan.json").exists():
        from slimexport.slim.apply import load_slim_unet

        return load_slim_unet(path)
    raise UsageError(f"the {backend} backend needs {accepts}, got {source!r}",
                     "pass the UNet (or a folder written by slimexport compress)")


def sm_tag(compute_capability: str | tuple[int, int]) -> str:
    """``"9.0"`` or ``(9, 0)`` -> ``"sm90"`` (engine and package file names)."""
    if isinstance(compute_capability, str):
        parts = compute_capability.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise UsageError(f"compute capability {compute_capability!r} is not major.minor", "pass e.g. '9.0'")
        major, minor = (int(p) for p in parts)
    else:
        major, minor = compute_capability
    return f"sm{major}{minor}"


def sidecar_for(artifact: str | Path, suffix: str) -> Path:
    """The JSON record beside a compiled artifact: ``unet.sm90.trt10.8.0.plan`` -> ``unet.sm90.trt10.8.0.json``
    (``suffix`` is the artifact's own, ``.plan`` or ``.pt2``; a name without it gets ``.json`` appended)."""
    p = Path(artifact)
    stem = p.name[: -len(suffix)] if p.name.endswith(suffix) else p.name
    return p.with_name(stem + ".json")


def refuse_incompatible(diffs: list[str], head: str, fix: str) -> None:
    """Raise :class:`IncompatibleArtifactError` ``"<head>: <diffs>"`` unless ``diffs`` (what differs between the
    machine a compiled engine or package was built for and this one) is empty."""
    if diffs:
        raise IncompatibleArtifactError(f"{head}: {'; '.join(diffs)}", fix)


def register_backend(name: str, factory: str) -> None:
    """Register ``"module:function"``; the function takes ``(source, cfg: EngineConfig)`` and returns an Engine."""
    BACKENDS[name] = factory


def build_engine(backend: str, source, cfg: EngineConfig | None = None) -> Engine:
    """Make an engine of ``backend`` (imported only now: ``onnxruntime``/``tensorrt`` stay unimported otherwise).

    Args:
        backend: ``torch``, ``onnxruntime``, ``tensorrt``, ``aoti``, ``torch-compile`` or ``openvino``.
        source: for ``torch``, ``aoti`` and ``torch-compile`` a ``UNet2DConditionModel`` (``aoti`` compiles it
            into ``cfg.cache_dir``, or reuses a matching package there; a ``.pt2`` package also loads); for
            ``onnxruntime`` an export folder or ``model.onnx``; for ``tensorrt`` an export folder or
            ``model.onnx`` (built, or reused if a matching engine exists) or a ``.plan`` file; for ``openvino`` an
            export folder or ``model.onnx`` (compiled for the CPU).
        cfg: settings; ``None`` uses :class:`EngineConfig` defaults.
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", f"use one of {', '.join(sorted(BACKENDS))}")
    if cfg is not None and cfg.dtype == "bf16" and backend not in BF16_BACKENDS:
        raise UsageError(f"dtype bf16 runs on the openvino backend only, not {backend}", "use backend openvino, or fp32/fp16")
    module, _, func = BACKENDS[backend].partition(":")
    factory = getattr(importlib.import_module(module), func)
    return factory(source, cfg or EngineConfig())
