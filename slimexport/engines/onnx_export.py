"""ONNX export of dense and slim UNets with the TensorRT demo's I/O, cleaned and checked.

Pipeline (``export_unet_onnx``):

1. TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, opset 19: the exporter proven on the SD
   UNet), into a scratch folder. SDPA, including :class:`~slimexport.slim.attention.SlimAttnProcessor`'s
   explicit ``scale=``, becomes plain ``MatMul``/``Softmax``.
2. Graph passes on the graph *without its weights*: the model is read with ``load_external_data=False``, so
   weights the exporter wrote to external files (models over 2 GB) stay on disk while onnx-graphsurgeon
   ``cleanup().toposort()`` and Polygraphy ``fold_constants`` rewrite the graph; only the few small
   initializers that folding evaluates (norm weights behind ``Identity`` nodes) are read in.
3. Weights streamed, tensor by tensor, into one ``model.onnx_data`` beside ``model.onnx`` (onnx's own
   external-data writer), so an SD-sized model is never held a second time in memory. (Under 2 GB the
   exporter embeds the weights in the proto; they are moved to a scratch file before step 2 for the same
   reason: the passes copy the model several times.)
4. Path-based shape inference, ``onnx.checker.check_model(full_check=True)``, a check that every node is a
   standard ONNX op, sha256 of both files, and ``export.json`` with the I/O spec. The folder appears
   atomically (built beside the target, then renamed).

fp16: the UNet is converted (a copy; the caller's model is untouched) to half precision with GroupNorm and
LayerNorm kept in fp32 (``Cast -> norm -> Cast``); ``timestep`` stays float32 unless ``timestep_dtype="sample"``.

``timestep`` has an axis of its own (``Bt``), so the graph takes ``[1]`` (one timestep for every row: diffusers'
``UNet2DConditionModel`` expands it to the batch, which exports as an ONNX ``Expand``) as well as ``[2B]``. Naming
it ``2B`` would make TensorRT hold it equal to the sample's batch and refuse the ``[1]`` that diffusers' ONNX
pipelines and the TensorRT demo pass.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimexport.artifacts import atomic_dir, read_json, sha256_file, write_json
from slimexport.engines.base import (
    OUTPUT_NAMES,
    TIMESTEP_DTYPES,
    io_spec_for_unet,
)
from slimexport.errors import ArtifactError, UsageError
from slimexport.models.arch import context_dim, latent_multiple

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
RESULT_FILE = "export.json"
RAW_WEIGHTS_FILE = "raw_weights.bin"  # scratch, beside the exporter's output; removed with it
EXPORT_FORMAT = "slimexport.onnx/1"
MIN_OPSET, MAX_OPSET = 17, 21  # 17: LayerNormalization as one op; 21: newest the TorchScript exporter knows
STANDARD_DOMAINS = ("", "ai.onnx")
# Initializers smaller than this stay inside model.onnx (onnx.save_model's default threshold): shape and axes
# constants must be readable by shape inference and the checker, which never open the external file.
INLINE_BYTES = 1024
ORT_WARNING, ORT_ERROR = 2, 3  # onnxruntime logger severities (2 is its default)
TRACE_TIMESTEP = 999.0  # the first step of a sampler; any value traces the same graph
TRACE_SEQ_LEN = 77  # CLIP's token count for SD1.x/2.x (static axis)


@dataclass(frozen=True)
class ExportResult:
    """What ``export_unet_onnx`` wrote.

    Attributes:
        onnx_path, data_path: ``model.onnx`` and its single external-data file ``model.onnx_data``.
        onnx_sha256, data_sha256: digests of both files.
        io_spec: names, dtypes, shapes (``2B``/``H``/``W`` dynamic; the timestep's ``Bt``: 1 or 2B) of inputs and
            outputs.
        opset, dtype: ONNX opset and ``fp32``/``fp16``.
        export_seconds: wall time of the whole export (trace, passes, writing, checks).
        size_bytes: size of both files together.
        op_counts: ONNX op type -> number of nodes.
        versions: torch, onnx, onnxruntime (folding), polygraphy, onnx-graphsurgeon.
        trace_shapes: input shapes the graph was traced with.
    """

    onnx_path: Path
    data_path: Path
    onnx_sha256: str
    data_sha256: str
    io_spec: dict
    opset: int
    dtype: str
    export_seconds: float
    size_bytes: int
    op_counts: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    trace_shapes: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.onnx_path.parent

    def to_dict(self) -> dict:
        d = asdict(self)
        d["onnx_path"], d["data_path"] = self.onnx_path.name, self.data_path.name
        return {"format": EXPORT_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict, folder: str | Path) -> ExportResult:
        d = dict(d)
        if d.pop("format", None) != EXPORT_FORMAT:
            raise ArtifactError(f"{folder} was not written by this exporter (format {EXPORT_FORMAT} expected)",
                                "re-export it (slimexport build)")
        folder = Path(folder)
        d["onnx_path"], d["data_path"] = folder / d["onnx_path"], folder / d["data_path"]
        return cls(**d)


def read_export(folder: str | Path, verify: bool = False) -> ExportResult:
    """Read ``export.json`` of an export folder; ``verify`` re-hashes both files against it.

    Raises:
        ArtifactError: missing or altered files.
    """
    folder = Path(folder)
    if folder.suffix == ".onnx":
        folder = folder.parent
    res = ExportResult.from_dict(read_json(folder / RESULT_FILE, "ONNX export record"), folder)
    if verify:
        for path, want in ((res.onnx_path, res.onnx_sha256), (res.data_path, res.data_sha256)):
            if not path.exists():
                raise ArtifactError(f"{path} is missing", "re-export the model (slimexport build)")
            got = sha256_file(path)
            if got != want:
                raise ArtifactError(f"{path} does not match its recorded sha256 (file {got[:12]}…, recorded "
                                    f"{want[:12]}…)", "delete the folder and re-export")
    return res


def default_shapes(unet, sample_shape, context_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    cfg = unet.config
    size = int(cfg.sample_size) if isinstance(cfg.sample_size, int) else int(cfg.sample_size[0])
    sample_shape = tuple(sample_shape or (2, int(cfg.in_channels), size, size))
    context_shape = tuple(context_shape or (sample_shape[0], TRACE_SEQ_LEN, context_dim(cfg)))
    down = latent_multiple(cfg)
    if len(sample_shape) != 4 or sample_shape[1] != cfg.in_channels or any(s % down for s in sample_shape[2:]):
        raise UsageError(f"sample_shape={list(sample_shape)} does not fit the UNet",
                         f"use (batch, {cfg.in_channels}, h, w) with h and w multiples of {down}")
    if len(context_shape) != 3 or context_shape[0] != sample_shape[0] or context_shape[2] != context_dim(cfg):
        raise UsageError(f"context_shape={list(context_shape)} does not fit sample_shape={list(sample_shape)}",
                         f"use ({sample_shape[0]}, 77, {context_dim(cfg)})")
    return sample_shape, context_shape


def check_standard_ops(model) -> Counter:
    """Op type counts of ``model`` (an ``onnx.ModelProto``); raises if any node is a custom or ATen op.

    Raises:
        ArtifactError: a node outside the standard ONNX domain (the exporter fell back to a custom op).
    """
    bad = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS
                  or n.op_type in ("ATen", "PythonOp")})
    if bad or model.functions:
        what = ", ".join(bad) or f"local functions {[f.name for f in model.functions]}"
        raise ArtifactError(f"the exported graph has non-standard ops ({what})",
                            "TensorRT and ONNX Runtime cannot run it; report the layer that produced it")
    return Counter(n.op_type for n in model.graph.node)


def _trace_to_onnx(module, args, path: Path, opset: int, io_spec: dict) -> None:
    """TorchScript export of ``module(*args)`` to ``path`` with ``io_spec``'s names and dynamic axes (weights over
    2 GB go to files beside it)."""
    dynamic_axes = {name: {axis: label for label, axis in axes.items()} for name, axes in io_spec["dynamic_axes"].items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[e["name"] for e in io_spec["inputs"]], output_names=[e["name"] for e in io_spec["outputs"]],
            dynamic_axes=dynamic_axes, export_params=True,
        )


def static_nodes(model) -> list:
    """Nodes of a topologically sorted graph that depend on no graph input (what constant folding evaluates)."""
    dynamic = {i.name for i in model.graph.input}
    out = []
    for node in model.graph.node:
        if any(i in dynamic for i in node.input if i):
            dynamic.update(node.output)
        else:
            out.append(node)
    return out


def _load_folded_weights(model, weights_dir: Path) -> None:
    """Read into the proto the external initializers that constant folding will evaluate (those feeding nodes
    that depend on no graph input, e.g. the ``Identity`` nodes of deduplicated norm weights); the rest stay
    on disk. ONNX Runtime, which evaluates the folded subgraphs from bytes, cannot open external files."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    inits = {t.name: t for t in model.graph.initializer}
    for node in static_nodes(model):
        for name in node.input:
            t = inits.get(name)
            if t is not None and uses_external_data(t):
                load_external_data_for_tensor(t, str(weights_dir))
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT


def _graph_passes(model, weights_dir: Path):
    """gs ``cleanup().toposort()`` then Polygraphy ``fold_constants``; weights not folded stay where they are
    (in the proto, or in the exporter's external files under ``weights_dir``)."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    graph = gs.import_onnx(model)
    del model
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    del graph
    _load_folded_weights(model, weights_dir)
    with _quiet_folding():
        # ONNX's own shape inference between passes: it needs no weight values (ORT's would read them).
        return fold_constants(model, allow_onnxruntime_shape_inference=False, error_ok=True)


@contextlib.contextmanager
def _quiet_folding():
    """Polygraphy's per-pass INFO lines, its loggers' note about the optional ``colored`` module and ONNX
    Runtime's optimizer warnings on the folding sessions are noise to users; warnings stay visible."""
    import onnxruntime
    from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
    from polygraphy.logger import G_LOGGER

    colors = (G_LOGGER.colors, GS_LOGGER.colors)
    G_LOGGER.colors = GS_LOGGER.colors = False
    onnxruntime.set_default_logger_severity(ORT_ERROR)
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            yield
    finally:
        onnxruntime.set_default_logger_severity(ORT_WARNING)
        G_LOGGER.colors, GS_LOGGER.colors = colors


def _write_weights(model, src_dir: Path, dst_dir: Path, location: str = DATA_FILE, move_external: bool = True) -> None:
    """Write every initializer of ``INLINE_BYTES`` or more into one file ``dst_dir/location``, one tensor in memory
    at a time, leaving the proto without weights (smaller ones are kept in it).

    Tensors already in external files are read from ``src_dir`` (or, with ``move_external=False``, left where
    they are). Uses onnx's own external-data writer (``save_external_data``).
    """
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import (
        _get_initializer_tensors,
        load_external_data_for_tensor,
        save_external_data,
        set_external_data,
        uses_external_data,
    )

    (dst_dir / location).touch()
    for tensor in _get_initializer_tensors(model):
        if uses_external_data(tensor):
            if not move_external:
                continue
            load_external_data_for_tensor(tensor, str(src_dir))
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
        elif not tensor.HasField("raw_data"):  # typed fields (float_data, ...): re-encode as raw bytes
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        if len(tensor.raw_data) < INLINE_BYTES:
            continue
        tensor.data_location = TensorProto.EXTERNAL
        set_external_data(tensor, location)
        save_external_data(tensor, str(dst_dir))
        tensor.ClearField("raw_data")


def export_versions() -> dict:
    import onnx

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    for name, mod in (("onnxruntime", "onnxruntime"), ("polygraphy", "polygraphy"), ("onnx_graphsurgeon", "onnx_graphsurgeon")):
        try:
            out[name] = __import__(mod).__version__
        except ImportError:
            out[name] = None
    return out


def finish_onnx(raw_dir: Path, out_dir: Path, what: str = "the exported ONNX graph",
                fix: str = "report this with the model name; the export is not usable"):
    """A raw trace in ``raw_dir`` → ``out_dir/model.onnx`` with one external data file: weights out of the proto,
    the graph passes, shape inference, ``onnx.checker`` and the standard-op check; ``raw_dir`` is removed.

    Returns ``(graph without its weights, op counts)``. ``what``/``fix``: the checker failure's wording."""
    import onnx

    model = onnx.load(str(raw_dir / MODEL_FILE), load_external_data=False)
    # Under 2 GB the exporter keeps the weights inside the proto: put them on disk too, so that the passes
    # (which copy the model several times) handle only the graph.
    _write_weights(model, raw_dir, raw_dir, location=RAW_WEIGHTS_FILE, move_external=False)
    model = _graph_passes(model, raw_dir)
    _write_weights(model, raw_dir, out_dir)
    onnx.save_model(model, str(out_dir / MODEL_FILE))
    del model
    shutil.rmtree(raw_dir)
    path = str(out_dir / MODEL_FILE)
    onnx.shape_inference.infer_shapes_path(path, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ArtifactError(f"{what} fails onnx.checker ({str(err).splitlines()[0]})", fix) from err
    graph = onnx.load(path, load_external_data=False)
    return graph, check_standard_ops(graph)


def export_unet_onnx(unet, out_dir: str | Path, *, opset: int = 19, dtype: str = "fp32", output_name: str = "latent",
                     sample_shape: tuple[int, int, int, int] | None = None,
                     context_shape: tuple[int, int, int] | None = None, timestep_dtype: str = "float32") -> ExportResult:
    """Export a dense or slim diffusers UNet to ``out_dir/model.onnx`` + ``out_dir/model.onnx_data``.

    Inputs ``sample [2B, C, H, W]`` (fp16 for an fp16 export, else fp32), ``timestep [Bt]`` float32 (``Bt`` is 1
    or 2B), ``encoder_hidden_states [2B, L, D]``; output ``latent`` (or ``out_sample``) ``[2B, C, H, W]``. ``2B``,
    ``Bt``, ``H`` and ``W`` are dynamic; ``L`` is static (77 for SD).

    Args:
        unet: a ``UNet2DConditionModel`` (dense or slim), any device; its weights are never modified (it is put in eval mode).
        out_dir: the export folder; replaced atomically if it exists.
        opset: ONNX opset, 17..21.
        dtype: ``fp32`` or ``fp16`` (GroupNorm/LayerNorm kept in fp32).
        output_name: ``latent`` (TensorRT demo) or ``out_sample`` (Optimum).
        sample_shape: ``(2B, C, h, w)`` to trace with; default ``(2, C, sample_size, sample_size)``.
        context_shape: ``(2B, L, D)`` to trace with; default ``(2B, 77, cross_attention_dim)``.
        timestep_dtype: ``float32``, or ``sample``: the sample's dtype (float16 in an fp16 export), for runtimes
            that bind the timestep in the sample's dtype (integer timesteps up to 2048 are exact in float16;
            fractional ones near 1000 round to 0.5).

    Returns:
        :class:`ExportResult` (also written to ``out_dir/export.json``).

    Raises:
        UsageError: bad arguments. ArtifactError: the graph fails the checker or holds non-standard ops.
    """

    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise UsageError(f"opset={opset!r} is not supported", f"use an integer in [{MIN_OPSET}, {MAX_OPSET}] (19 is the default)")
    if dtype not in ("fp32", "fp16"):
        raise UsageError(f"dtype={dtype!r} is not supported for ONNX export", "use fp32 or fp16")
    if output_name not in OUTPUT_NAMES:
        raise UsageError(f"output_name={output_name!r} is not supported", f"use one of {', '.join(OUTPUT_NAMES)}")
    if timestep_dtype not in TIMESTEP_DTYPES:
        raise UsageError(f"timestep_dtype={timestep_dtype!r} is not supported", f"use one of {', '.join(TIMESTEP_DTYPES)}")
    t0 = time.perf_counter()
    sample_shape, context_shape = default_shapes(unet, sample_shape, context_shape)
    io_spec = io_spec_for_unet(unet, dtype=dtype, output_name=output_name, seq_len=context_shape[1],
                               broadcast_timestep=True, timestep_dtype=timestep_dtype)

    from slimexport.engines.torch_runner import UNetIO, converted_copy

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    module = converted_copy(unet.eval(), dtype=torch_dtype, fp32_norms=dtype == "fp16")
    device = next(module.parameters()).device
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randn(sample_shape, generator=gen).to(device, torch_dtype),
        torch.full((sample_shape[0],), TRACE_TIMESTEP, dtype=torch_dtype if timestep_dtype == "sample" else torch.float32,
                   device=device),
        torch.randn(context_shape, generator=gen).to(device, torch_dtype),
    )
    result = export_traced(UNetIO(module).eval(), args, io_spec, out_dir, opset, dtype, t0)
    del module, args
    log.info("exported %s (%s, %.1f MB) in %.1f s", out_dir, dtype, result.size_bytes / 1e6, result.export_seconds)
    return result


def build_export_args(cfg, unet, profile, seq_len: int) -> dict:
    """:func:`export_unet_onnx`'s settings in a build (``cfg``: a ``BuildConfig``): its dense, slim and step-cache
    graphs alike, traced at the profile's optimum shape with ``seq_len`` text tokens."""
    c = int(unet.config.in_channels)
    dtype = "fp32" if cfg.export.dtype == "bf16" else cfg.export.dtype  # bf16: an fp32 graph OpenVINO runs in bf16
    return {"opset": cfg.export.opset, "dtype": dtype, "output_name": cfg.export.output_name,
            "sample_shape": (profile.opt_batch, c, profile.opt_height, profile.opt_width),
            "context_shape": (profile.opt_batch, seq_len, context_dim(unet))}


def export_for_build(cfg, unet, folder: Path, profile, seq_len: int) -> None:
    """A build's export of ``unet`` into ``folder`` (:func:`build_export_args`)."""
    export_unet_onnx(unet, folder, **build_export_args(cfg, unet, profile, seq_len))


def export_traced(module, args: tuple, io_spec: dict, out_dir: str | Path, opset: int, dtype: str,
                  t0: float | None = None) -> ExportResult:
    """``module(*args)`` traced to ``out_dir`` under ``io_spec``'s names, then the steps every export takes: graph
    cleanup and constant folding (:func:`finish_onnx`), one external-data file, the I/O check, ``export.json``;
    written atomically. ``t0``: when the export started (its ``export_seconds``), default now."""
    t0 = time.perf_counter() if t0 is None else t0
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        raw_dir = tmp / "raw"
        raw_dir.mkdir()
        _trace_to_onnx(module, args, raw_dir / MODEL_FILE, opset, io_spec)
        graph_only, ops = finish_onnx(raw_dir, tmp)
        _check_io(graph_only, io_spec)
        del graph_only
        extra = sorted(p.name for p in tmp.iterdir() if p.name not in (MODEL_FILE, DATA_FILE))
        if extra:
            raise ArtifactError(f"the export left unexpected files {extra}", "report this; only one external data file is expected")
        sizes = (tmp / MODEL_FILE).stat().st_size + (tmp / DATA_FILE).stat().st_size
        result = ExportResult(
            onnx_path=out_dir / MODEL_FILE, data_path=out_dir / DATA_FILE,
            onnx_sha256=sha256_file(tmp / MODEL_FILE), data_sha256=sha256_file(tmp / DATA_FILE),
            io_spec=io_spec, opset=opset, dtype=dtype, export_seconds=round(time.perf_counter() - t0, 3), size_bytes=sizes,
            op_counts=dict(sorted(ops.items())), versions=export_versions(),
            trace_shapes={e["name"]: list(a.shape) for e, a in zip(io_spec["inputs"], args)},
        )
        write_json(tmp / RESULT_FILE, result.to_dict())
    return result


def _check_io(model, io_spec: dict) -> None:
    """The graph's inputs/outputs carry the names, element types and axes (dynamic by label, static by size) of
    ``io_spec``."""
    from onnx import helper

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    got = {v.name: (helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims(v))
           for v in list(model.graph.input) + list(model.graph.output)}
    want = {e["name"]: (e["dtype"], list(e["shape"])) for e in io_spec["inputs"] + io_spec["outputs"]}
    if got != want:
        raise ArtifactError(f"exported I/O {got} differs from the intended {want}", "report this with the model name")
