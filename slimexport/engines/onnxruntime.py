"""The ONNX Runtime backend: one ``InferenceSession`` on an exported UNet folder.

CPU by default; the CUDA and TensorRT execution providers when ``onnxruntime-gpu`` is installed and asked for
(``device="cuda"`` or ``providers=...``). ``onnxruntime`` is imported only inside these functions, so
``import slimexport`` never loads it. The thread count is always set explicitly and recorded.

fp16 exports on the CPU provider: ONNX Runtime has no fp16 CPU kernels for most ops and inserts ``Cast``
nodes around them (computing in fp32), so an fp16 model loads and runs on CPU but is no faster than fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from slimexport.engines.base import BATCH_AXIS, TIMESTEP, TIMESTEP_AXIS, Engine, EngineConfig
from slimexport.errors import ArtifactError, MissingExtraError, UsageError

CPU_EP, CUDA_EP, TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
ORT_ERROR = 3  # session log severity: errors only (the optimizer's warnings are not actionable for users)


def resolve_onnx(source) -> Path:
    """``model.onnx`` from an export folder or the file itself.

    Raises:
        ArtifactError: nothing there.
    """
    from slimexport.engines.onnx_export import MODEL_FILE

    path = Path(source)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise ArtifactError(f"ONNX model {path} is missing", "export it first (slimexport build)")
    return path


def io_spec_from_model(path: Path) -> dict:
    """The export's I/O spec from ``export.json`` beside ``model.onnx``, or read off the graph if absent."""
    from slimexport.engines.onnx_export import RESULT_FILE, read_export

    if (path.parent / RESULT_FILE).exists():
        return read_export(path.parent).io_spec
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def entry(v):
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        out = {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, "shape": dims}
        if v.name == TIMESTEP and dims == [TIMESTEP_AXIS]:  # the export's own timestep axis: 1 or 2B
            out["sizes"] = {TIMESTEP_AXIS: [1, BATCH_AXIS]}
        return out

    inputs, outputs = [entry(v) for v in model.graph.input], [entry(v) for v in model.graph.output]
    dyn = {e["name"]: {d: i for i, d in enumerate(e["shape"]) if isinstance(d, str)} for e in inputs + outputs}
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": dyn}


def choose_providers(device: str, providers: tuple[str, ...] | None, available: list[str]) -> list[str]:
    """Execution providers for ``device`` (pure: ``available`` is ``onnxruntime.get_available_providers()``).

    Raises:
        MissingExtraError: a GPU provider was asked for but this onnxruntime build lacks it.
    """
    if providers is None:
        providers = (CPU_EP,) if device == "cpu" else (CUDA_EP,)
    missing = [p for p in providers if p not in available]
    if missing:
        if any(p in (CUDA_EP, TRT_EP) for p in missing):
            raise MissingExtraError("onnxruntime-gpu", "gpu", f"onnxruntime on {device} ({', '.join(missing)})")
        raise UsageError(f"onnxruntime has no execution provider {', '.join(missing)}",
                         f"available here: {', '.join(available)}")
    out = list(providers)
    if device != "cpu" and CPU_EP not in out:
        out.append(CPU_EP)  # ops a GPU provider lacks fall back to the CPU
    return out


class OrtEngine(Engine):
    """An ONNX Runtime session with the engine interface."""

    name = "onnxruntime"

    def __init__(self, source, cfg: EngineConfig | None = None):
        import onnxruntime as ort

        from slimexport.engines.torch_runner import available_cpus

        cfg = cfg or EngineConfig()
        self.cfg = cfg
        self.path = resolve_onnx(source)
        self.io_spec = io_spec_from_model(self.path)
        self.profile = cfg.profile
        self.providers = choose_providers(cfg.device, cfg.providers, ort.get_available_providers())
        self.device = "cpu" if self.providers[0] == CPU_EP else (cfg.device if ":" in cfg.device else "cuda:0")
        self.threads = cfg.threads or available_cpus()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = ORT_ERROR
        provider_options = [self._provider_options(p) for p in self.providers]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers,
                                                provider_options=provider_options)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ArtifactError(f"onnxruntime cannot load {self.path} ({type(err).__name__}: {str(err).splitlines()[0]})",
                                "re-export the model (slimexport build)") from err
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._ort_version = ort.__version__

    def _provider_options(self, provider: str) -> dict:
        if provider in (CUDA_EP, TRT_EP):
            index = self.cfg.device.partition(":")[2] or "0"
            return {"device_id": index}
        return {}

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return dict(zip(self.output_names, outs))

    def info(self) -> dict:
        from slimexport.engines.torch_runner import device_name

        return {
            "backend": self.name, "device": self.device,
            "device_name": device_name(self.device),
            "threads": self.threads, "providers": self.session.get_providers(), "onnx": str(self.path),
            "versions": {"onnxruntime": self._ort_version},
        }

    def close(self) -> None:
        self.session = None


def create(source, cfg: EngineConfig) -> OrtEngine:
    """Registry factory: ``source`` is an export folder or ``model.onnx``."""
    return OrtEngine(source, cfg)
