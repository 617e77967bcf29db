"""The OpenVINO backend: the exported ONNX compiled for the CPU by OpenVINO Runtime (``slimexport[openvino]``).

OpenVINO reads the same export folder as ONNX Runtime (``model.onnx`` + external data), fixes the dynamic axes
to the engine profile's ranges, and compiles the graph for its CPU plugin with ``PERFORMANCE_HINT=LATENCY``
(one stream on all the threads given). ``openvino`` is imported only when an engine is made.

Precision is pinned, never left to the plugin: on CPUs with AVX-512 BF16 or AMX the CPU plugin computes in bf16
by default (``INFERENCE_PRECISION_HINT``), which changes the numbers; on other CPUs it silently ignores a bf16 or
f16 hint and computes f32. So the hint is always set, read back from the compiled model and refused if it did
not take:

- ``dtype`` fp32 (an fp32 export): f32.
- ``dtype`` bf16 (an fp32 export; inputs and outputs stay float32): bf16, gated with the bf16 tolerance.
  Refused on a CPU without native bf16, where OpenVINO would compute f32.
- an fp16 export: f32 on its fp16 weights and I/O. The CPU plugin computes f16 only on CPUs with AVX512-FP16 or
  AMX-FP16 and silently computes f32 on the others; pinning f32 gives the same numbers on every CPU, at least
  as accurate as fp16 (gated with the fp16 tolerance). Like ONNX Runtime's CPU provider, it is no faster than fp32.

``cache_dir``: OpenVINO's model cache (``CACHE_DIR``). OpenVINO names each blob by a hash of the model, the
compile properties and its own version, and recompiles (replacing the blob) when one does not load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from slimexport.engines.base import BATCH_AXIS, HEIGHT_AXIS, SAMPLE, WIDTH_AXIS, Engine, EngineConfig
from slimexport.engines.onnxruntime import io_spec_from_model, resolve_onnx
from slimexport.errors import ArtifactError, UsageError, require

OV_DEVICE = "CPU"
# INFERENCE_PRECISION_HINT per engine dtype (fp16 exports: f32, see the module docstring).
PRECISION_HINTS = {"fp32": "f32", "fp16": "f32", "bf16": "bf16"}
BF16_CAPABILITY = "BF16"  # in the CPU plugin's OPTIMIZATION_CAPABILITIES where it computes bf16


def _require_ov():
    return require("openvino", "openvino", "--backend openvino")


def precision_hint(cfg_dtype: str, onnx_dtype: str) -> str:
    """The ``INFERENCE_PRECISION_HINT`` to pin for an engine ``dtype`` on an export of ``onnx_dtype`` (pure).

    Raises:
        UsageError: bf16 from an fp16 export (bf16 runs from the fp32 export).
    """
    if cfg_dtype == "bf16" and onnx_dtype != "float32":
        raise UsageError(f"dtype bf16 on the openvino backend runs from an fp32 export, this one is {onnx_dtype}",
                         "export fp32 (--dtype bf16 exports fp32 ONNX)")
    return PRECISION_HINTS[cfg_dtype]


def check_cpu_precision(dtype: str, core=None) -> None:
    """Refuse, before any work, an engine ``dtype`` that this CPU's OpenVINO plugin would not compute in: bf16
    without AVX-512 BF16 or AMX (the plugin would silently compute f32).

    Raises:
        MissingExtraError: openvino is not installed. UsageError: no bf16 here.
    """
    if dtype != "bf16":
        return
    from slimexport.engines.torch_runner import device_name

    core = core or _require_ov().Core()
    if BF16_CAPABILITY not in core.get_property(OV_DEVICE, "OPTIMIZATION_CAPABILITIES"):
        raise UsageError(f"this CPU ({device_name('cpu')}) has no bf16 that OpenVINO computes in (AVX-512 BF16 or AMX); "
                         "it would run f32", "use --dtype fp32 here, or run on a CPU with bf16")


def _partial_shapes(io_spec: dict, profile, ov) -> dict:
    """Each input's shape with ``2B``/``H``/``W`` bounded to ``profile``'s ranges, other named axes left dynamic
    (static axes as exported)."""
    bounds = {BATCH_AXIS: (profile.min_batch, profile.max_batch), HEIGHT_AXIS: (profile.min_height, profile.max_height),
              WIDTH_AXIS: (profile.min_width, profile.max_width)}
    out = {}
    for entry in io_spec["inputs"]:
        dims = [ov.Dimension(int(d)) if not isinstance(d, str) else ov.Dimension(*bounds[d]) if d in bounds else ov.Dimension()
                for d in entry["shape"]]
        out[entry["name"]] = ov.PartialShape(dims)
    return out


class OvEngine(Engine):
    """An OpenVINO compiled model on the CPU with the engine interface."""

    name = "openvino"
    device = "cpu"

    def __init__(self, source, cfg: EngineConfig | None = None):
        ov = _require_ov()
        from slimexport.engines.torch_runner import available_cpus, device_name

        cfg = cfg or EngineConfig()
        if cfg.device != "cpu":
            raise UsageError(f"the openvino backend runs on the CPU only, not {cfg.device}",
                             "use --engine-device cpu (or auto), or --backend onnxruntime/tensorrt on a GPU")
        self.cfg = cfg
        self.path = resolve_onnx(source)
        self.io_spec = io_spec_from_model(self.path)
        self.profile = cfg.profile
        self.threads = cfg.threads or available_cpus()
        onnx_dtype = next(e["dtype"] for e in self.io_spec["inputs"] if e["name"] == SAMPLE)
        self.precision = precision_hint(cfg.dtype, onnx_dtype)
        core = ov.Core()
        check_cpu_precision(cfg.dtype, core)
        if cfg.cache_dir is not None:
            Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cfg.cache_dir)})
        try:
            model = core.read_model(str(self.path))
            if self.profile is not None:
                model.reshape(_partial_shapes(self.io_spec, self.profile, ov))
            self.compiled = core.compile_model(model, OV_DEVICE, {
                "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": self.threads})
        except Exception as err:  # OpenVINO raises RuntimeError/GeneralFailure with multi-line texts
            raise ArtifactError(f"openvino cannot compile {self.path} ({type(err).__name__}: {str(err).strip().splitlines()[0]})",
                                "re-export the model (slimexport build)") from err
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16
        if got != self.precision:  # the plugin ignores hints the CPU cannot honour: never run another precision silently
            raise UsageError(f"OpenVINO compiled {self.path} in {got}, not the {self.precision} asked for, on this CPU "
                             f"({device_name('cpu')})", "use --dtype fp32 here")
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()
        self._ov_version = ov.get_version()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_inputs=True)
        return {name: res[i] for i, name in enumerate(self.output_names)}  # copies (share_outputs=False)

    def info(self) -> dict:
        from slimexport.engines.torch_runner import device_name

        return {
            "backend": self.name, "device": self.device, "device_name": device_name(self.device),
            "threads": self.threads, "inference_precision": self.precision,
            "streams": int(self.compiled.get_property("NUM_STREAMS")), "performance_hint": "LATENCY",
            "onnx": str(self.path), "cache_dir": self.cfg.cache_dir, "versions": {"openvino": self._ov_version},
        }

    def close(self) -> None:
        self._request = None
        self.compiled = None


def create(source, cfg: EngineConfig) -> OvEngine:
    """Registry factory: ``source`` is an export folder or ``model.onnx``."""
    return OvEngine(source, cfg)
