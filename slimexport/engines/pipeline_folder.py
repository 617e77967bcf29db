"""The pipeline folder: the slim UNet's ONNX with the rest of a Stable Diffusion pipeline in ONNX, laid out as
diffusers' ``OnnxStableDiffusionPipeline`` and Optimum's ``ORTStableDiffusionPipeline`` load it.

```
pipeline/
  model_index.json    _class_name OnnxStableDiffusionPipeline; each part's library and class
  slimexport.json     what was written: source model, dtype, opset, scheduler, each part's I/O and sha256
  text_encoder/       model.onnx + model.onnx_data, config.json (the CLIP text config)
  unet/               the slim UNet's ONNX (output renamed out_sample), config.json (the UNet's config)
  vae_decoder/        model.onnx + model.onnx_data, config.json (the VAE's config)
  vae_encoder/        model.onnx + model.onnx_data, config.json
  tokenizer/          the CLIP tokenizer's files
  scheduler/          scheduler_config.json
```

I/O, as both clients feed them (diffusers: ``pipelines/onnx_utils.py`` and ``pipeline_onnx_stable_diffusion.py``
0.42; Optimum: ``onnxruntime/modeling_diffusion.py`` and the ONNX configs of ``optimum-onnx`` 0.1):

- text_encoder: ``input_ids [batch, sequence]`` int32 → ``last_hidden_state [batch, sequence, D]``,
  ``pooler_output [batch, D]``.
- unet: ``sample [2B, C, H, W]``, ``timestep [Bt]`` (diffusers passes ``[1]`` in the graph's dtype),
  ``encoder_hidden_states [2B, 77, D]`` → ``out_sample`` (Optimum reads the output by that name).
- vae_encoder: ``sample [batch, 3, height, width]`` → ``latent_sample`` (the posterior mean: deterministic; both
  clients take this output as the latents).
- vae_decoder: ``latent_sample [batch, C, h, w]`` → ``sample [batch, 3, height, width]``.

Every axis but the channels and CLIP's width is dynamic (the UNet's text length is static, as exported). Each
part is traced and cleaned as the UNet is (:mod:`slimexport.engines.onnx_export`: TorchScript exporter, onnx-
graphsurgeon cleanup, constant folding, weights streamed into one ``model.onnx_data``, ``onnx.checker``, standard
ops only); in fp16 the norms stay fp32. The UNet is not re-exported: its graph, read without its weights, gets its
output renamed where needed, and its weights file is copied beside it (onnx's checker refuses a hard-linked or
symlinked external data file), so an SD-sized UNet is never loaded into memory, but is stored twice on disk.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimexport.artifacts import atomic_dir, read_json, sha256_file, write_json
from slimexport.engines.base import TIMESTEP, TIMESTEP_AXIS
from slimexport.engines.onnx_export import (
    DATA_FILE,
    MAX_OPSET,
    MIN_OPSET,
    MODEL_FILE,
    export_versions,
    finish_onnx,
    read_export,
)
from slimexport.errors import ArtifactError, UsageError

log = logging.getLogger(__name__)

PIPELINE_FORMAT = "slimexport.pipeline/1"
RECORD_FILE = "slimexport.json"
CONFIG_FILE = "config.json"  # diffusers' and transformers' config name; Optimum needs one beside each model.onnx
PIPELINE_CLASS = "OnnxStableDiffusionPipeline"  # diffusers' loader picks the class by this; Optimum's by its own
ORT_MODEL = ["diffusers", "OnnxRuntimeModel"]
UNET_OUTPUT = "out_sample"  # the name Optimum's ORTUnet reads
PARTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
TRACE_LATENT = 8  # latent cells per side to trace the VAE with (any size traces the same graph)
TRACE_PROMPT = "a photograph of an astronaut riding a horse"
PIPELINE_FIX = "the pipeline folder needs a text-to-image pipeline with a CLIP text encoder and a VAE " \
               "(a diffusers pipeline folder with text_encoder/, tokenizer/ and vae/ weights, or tiny)"


@dataclass(frozen=True)
class PipelineFolderResult:
    """What :func:`write_pipeline_folder` wrote (also in ``folder/slimexport.json``).

    Attributes:
        folder: the pipeline folder.
        model, source: the bundle's name and where its weights came from.
        dtype, opset: ``fp32``/``fp16`` of every part; the opset of the parts exported here.
        scheduler: the scheduler's class name (its config is ``scheduler/scheduler_config.json``).
        parts: ``{part: {"files": {name: sha256}, "inputs": [...], "outputs": [...]}}`` for text_encoder, unet,
            vae_encoder, vae_decoder; each I/O entry is ``{"name", "dtype", "shape"}``, dynamic axes by name.
        seconds: wall time of the whole write.
        versions: torch, onnx, onnxruntime, polygraphy, onnx-graphsurgeon, diffusers, transformers.
    """

    folder: Path
    model: str
    source: str
    dtype: str
    opset: int
    scheduler: str
    parts: dict = field(default_factory=dict)
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        return {"format": PIPELINE_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict, folder: str | Path) -> PipelineFolderResult:
        d = dict(d)
        if d.pop("format", None) != PIPELINE_FORMAT:
            raise ArtifactError(f"{folder} was not written by this version of slimexport (format {PIPELINE_FORMAT} "
                                "expected)", "write it again (slimexport build --pipeline)")
        return cls(folder=Path(folder), **d)


def read_pipeline_folder(folder: str | Path, verify: bool = False) -> PipelineFolderResult:
    """Read ``slimexport.json`` of a pipeline folder; ``verify`` re-hashes every part's files against it.

    Raises:
        ArtifactError: a missing record, a missing or altered file.
    """
    folder = Path(folder)
    res = PipelineFolderResult.from_dict(read_json(folder / RECORD_FILE, "pipeline folder record"), folder)
    fix = "write the pipeline folder again (slimexport build --pipeline)"
    if verify:
        for part, entry in res.parts.items():
            for name, want in entry["files"].items():
                path = folder / part / name
                if not path.exists():
                    raise ArtifactError(f"{path} is missing", fix)
                if sha256_file(path) != want:
                    raise ArtifactError(f"{path} does not match its recorded sha256", fix)
    return res


def write_pipeline_folder(bundle, slim_onnx_folder: str | Path, out_dir: str | Path, *, opset: int | None = None,
                          dtype: str | None = None, scheduler=None) -> PipelineFolderResult:
    """Write ``out_dir`` as a pipeline folder around the slim UNet's ONNX export (layout in the module docstring).

    Args:
        bundle: a :class:`~slimexport.models.bundle.ModelBundle` whose ``components`` hold ``tokenizer``,
            ``text_encoder`` (a CLIP text model) and ``vae`` (an ``AutoencoderKL``); its UNet gives ``unet/config.json``.
        slim_onnx_folder: the slim UNet's export folder (``onnx/slim``: ``model.onnx``, ``model.onnx_data``,
            ``export.json``), output ``latent`` or ``out_sample``.
        out_dir: the pipeline folder; replaced atomically if it exists.
        opset: ONNX opset of the text encoder and VAE exports; default the UNet export's.
        dtype: ``fp32`` or ``fp16`` for every part; default, and the only one accepted, the UNet export's (the
            clients pass the text encoder's output dtype on to the UNet and the VAE).
        scheduler: a diffusers scheduler to write; default the source pipeline's own (``scheduler/`` of the folder
            the bundle was loaded from), else the bundle's DDIM sampler (``bundle.make_scheduler()``).

    Returns:
        :class:`PipelineFolderResult` (also written to ``out_dir/slimexport.json``).

    Raises:
        UsageError: a model without a CLIP text encoder or VAE (e.g. ``digits``), a dtype other than the UNet
            export's, an export that does not fit the model. ArtifactError: a missing or altered UNet export, a
            part that fails ``onnx.checker`` or holds non-standard ops.
    """
    import diffusers
    import transformers

    t0 = time.perf_counter()
    text_encoder, tokenizer, vae = pipeline_components(bundle)
    export = read_export(slim_onnx_folder, verify=True)
    dtype = export.dtype if dtype is None else dtype
    opset = export.opset if opset is None else opset
    if dtype != export.dtype:
        raise UsageError(f"dtype={dtype!r} differs from the slim UNet export's ({export.dtype})",
                         f"write the pipeline folder in {export.dtype}, or re-export the UNet in {dtype}")
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise UsageError(f"opset={opset!r} is not supported", f"use an integer in [{MIN_OPSET}, {MAX_OPSET}] (19 is the default)")
    _check_unet_export(export, bundle, text_encoder, tokenizer, vae)
    scheduler = scheduler if scheduler is not None else _source_scheduler(bundle) or bundle.make_scheduler()

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    out_dir = Path(out_dir)
    parts = {}
    with atomic_dir(out_dir) as tmp:
        parts["text_encoder"] = _export_text_encoder(text_encoder, tokenizer, tmp / "text_encoder", opset, torch_dtype)
        text_encoder.config.to_json_file(str(tmp / "text_encoder" / CONFIG_FILE))
        parts["unet"] = _place_unet(export, tmp / "unet")
        bundle.unet.save_config(str(tmp / "unet"))
        parts["vae_encoder"] = _export_vae(vae, "encoder", tmp / "vae_encoder", opset, torch_dtype)
        parts["vae_decoder"] = _export_vae(vae, "decoder", tmp / "vae_decoder", opset, torch_dtype)
        for part in ("vae_encoder", "vae_decoder"):
            vae.save_config(str(tmp / part))
        for part in PARTS:
            parts[part]["files"][CONFIG_FILE] = sha256_file(tmp / part / CONFIG_FILE)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _bpe_files(tmp / "tokenizer")
        scheduler.save_config(str(tmp / "scheduler"))
        index = {
            "_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", type(scheduler).__name__], "text_encoder": ORT_MODEL,
            "tokenizer": ["transformers", type(tokenizer).__name__], "unet": ORT_MODEL,
            "vae_decoder": ORT_MODEL, "vae_encoder": ORT_MODEL,
        }
        write_json(tmp / "model_index.json", index)
        result = PipelineFolderResult(
            folder=out_dir, model=bundle.name, source=bundle.source, dtype=dtype, opset=opset,
            scheduler=type(scheduler).__name__, parts=parts, seconds=round(time.perf_counter() - t0, 3),
            versions={**export_versions(), "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        )
        write_json(tmp / RECORD_FILE, result.to_dict())
    log.info("wrote pipeline folder %s (%s) in %.1f s", out_dir, dtype, result.seconds)
    return result


def is_pipeline_source(bundle) -> bool:
    """Whether a build writes ``pipeline/`` by default: a trained model read from a pipeline folder or the hub."""
    return not bundle.weights_random and {"text_encoder", "vae", "tokenizer"} <= set(bundle.components)


def pipeline_components(bundle) -> tuple:
    """``(text_encoder, tokenizer, vae)`` of the bundle, or a one-line error saying what a pipeline folder needs
    (cheap: call it before the long stages when a pipeline folder is asked for).

    Raises:
        UsageError: no VAE, text encoder or tokenizer (``digits``, a UNet-only folder, ``--random-weights``, a hub
            download without the VAE's weights), or ones of other classes.
    """
    comps = getattr(bundle, "components", None) or {}
    names = {"vae": "VAE", "text_encoder": "text encoder", "tokenizer": "tokenizer"}
    missing = [names[k] for k in names if k not in comps]
    if missing:
        raise UsageError(f"model '{bundle.name}' has no {' and no '.join(missing)}: there is no text-to-image "
                         "pipeline to write", PIPELINE_FIX)
    text_encoder, tokenizer, vae = comps["text_encoder"], comps["tokenizer"], comps["vae"]
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    if not isinstance(text_encoder, CLIPTextModel) or not isinstance(vae, AutoencoderKL):
        raise UsageError(f"model '{bundle.name}' has a {type(text_encoder).__name__} text encoder and a "
                         f"{type(vae).__name__} VAE, not a CLIPTextModel and an AutoencoderKL", PIPELINE_FIX)
    return text_encoder, tokenizer, vae


def _check_unet_export(export, bundle, text_encoder, tokenizer, vae) -> None:
    """The export takes what the clients feed: a ``[1]`` timestep, the tokenizer's length, the text encoder's width,
    the VAE's latent channels."""
    shapes = {e["name"]: e for e in export.io_spec["inputs"]}
    where = f"the slim UNet export {export.folder}"
    if shapes[TIMESTEP]["shape"] != [TIMESTEP_AXIS]:
        raise UsageError(f"{where} takes timestep {shapes[TIMESTEP]['shape']}, not the [1] that diffusers' ONNX "
                         "pipeline passes (an export from an earlier slimexport)", "re-export it (slimexport build)")
    sample, context = shapes["sample"]["shape"], shapes["encoder_hidden_states"]["shape"]
    want = {"text length": (context[1], tokenizer.model_max_length),
            "text width": (context[2], text_encoder.config.hidden_size),
            "latent channels": (sample[1], vae.config.latent_channels)}
    bad = {k: v for k, v in want.items() if v[0] != v[1]}
    if bad or int(bundle.unet.config.in_channels) != sample[1]:
        what = ", ".join(f"{k} {got} (model: {exp})" for k, (got, exp) in bad.items()) or "input channels"
        raise UsageError(f"{where} does not fit model '{bundle.name}': {what}",
                         "pass the slim export made from this model (its build folder's onnx/slim)")


def _source_scheduler(bundle):
    """The scheduler of the pipeline folder the bundle came from, or ``None`` (built-in, UNet-only or no
    ``scheduler/``)."""
    if not bundle.unet_source_dir:
        return None
    unet_dir = Path(bundle.unet_source_dir)
    path = unet_dir.parent / "scheduler" / "scheduler_config.json"
    if unet_dir.name != "unet" or not (unet_dir.parent / "model_index.json").exists() or not path.exists():
        return None
    import diffusers

    cfg = read_json(path, "scheduler config")
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UsageError(f"{path} names no diffusers scheduler (_class_name={name!r})",
                         "correct that file, or pass scheduler= to write_pipeline_folder")
    return cls.from_config(cfg)


def _trace(module, args: tuple, path: Path, opset: int, input_names: list, output_names: list,
           dynamic_axes: dict) -> None:
    """TorchScript export, as the UNet's (:func:`slimexport.engines.onnx_export.export_unet_onnx`), any I/O names."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # CLIP's pooler indexes with argmax positions, never negative
        warnings.filterwarnings("ignore", message=".*advanced indexing.*negative values.*")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          export_params=True)


def _export_part(module, args: tuple, out_dir: Path, opset: int, dtype: torch.dtype, input_names: list,
                 output_names: list, dynamic_axes: dict) -> dict:
    """``module(*args)`` to ``out_dir/model.onnx`` + ``model.onnx_data``, through the UNet export's passes and
    checks; returns ``{"files": {name: sha256}, "inputs": [...], "outputs": [...]}``."""

    from slimexport.engines.torch_runner import converted_copy

    module = converted_copy(module.eval(), dtype=dtype, fp32_norms=dtype == torch.float16)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    out_dir.mkdir(parents=True)
    raw_dir = out_dir / "raw"
    raw_dir.mkdir()
    _trace(module, args, raw_dir / MODEL_FILE, opset, input_names, output_names, dynamic_axes)
    del module
    graph, _ = finish_onnx(raw_dir, out_dir, f"the exported {out_dir.name}",
                           "report this with the model name; the pipeline folder is not usable")
    io = _graph_io(graph)
    got = [e["name"] for e in io["inputs"]], [e["name"] for e in io["outputs"]]
    if got != (list(input_names), list(output_names)):
        raise ArtifactError(f"the exported {out_dir.name} has I/O {got}, not {(input_names, output_names)}",
                            "report this with the model name")
    return {"files": {n: sha256_file(out_dir / n) for n in (MODEL_FILE, DATA_FILE)}, **io}


def _graph_io(model) -> dict:
    """``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}`` of an ``onnx.ModelProto`` (axis names for
    dynamic dimensions)."""
    from onnx import helper

    def entry(v):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, "shape": dims}

    return {"inputs": [entry(v) for v in model.graph.input], "outputs": [entry(v) for v in model.graph.output]}


def _bpe_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` from ``tokenizer.json`` where ``save_pretrained`` left them out
    (transformers 5 writes only ``tokenizer.json``; transformers 4's ``CLIPTokenizer``, which Optimum's current
    release pins, reads only those two)."""
    import json

    if (folder / "vocab.json").exists() or not (folder / "tokenizer.json").exists():
        return
    model = read_json(folder / "tokenizer.json", "tokenizer").get("model", {})
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")


class _TextEncoderIO(torch.nn.Module):
    """``input_ids -> (last_hidden_state, pooler_output)`` of a ``CLIPTextModel``."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def _export_text_encoder(text_encoder, tokenizer, out_dir: Path, opset: int, dtype: torch.dtype) -> dict:
    # int32 ids, as diffusers' ONNX pipeline feeds them (Optimum casts to the graph's type)
    ids = tokenizer([TRACE_PROMPT], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(torch.int32)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
            "pooler_output": {0: "batch"}}
    return _export_part(_TextEncoderIO(text_encoder), (ids,), out_dir, opset, dtype, ["input_ids"],
                        ["last_hidden_state", "pooler_output"], axes)


class _VaeIO(torch.nn.Module):
    """One half of an ``AutoencoderKL``: ``sample -> latent_sample`` (the posterior mean) or ``latent_sample -> sample``."""

    def __init__(self, vae, half: str):
        super().__init__()
        self.vae, self.half = vae, half

    def forward(self, x):
        if self.half == "encoder":
            return self.vae.encode(x).latent_dist.mode()
        return self.vae.decode(x).sample


def _export_vae(vae, half: str, out_dir: Path, opset: int, dtype: torch.dtype) -> dict:
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    gen = torch.Generator().manual_seed(0)
    pixels = {0: "batch", 2: "height", 3: "width"}
    latents = {0: "batch", 2: "latent_height", 3: "latent_width"}
    if half == "encoder":
        x = torch.randn(1, vae.config.in_channels, TRACE_LATENT * scale, TRACE_LATENT * scale, generator=gen)
        names, axes = (["sample"], ["latent_sample"]), {"sample": pixels, "latent_sample": latents}
    else:
        x = torch.randn(1, vae.config.latent_channels, TRACE_LATENT, TRACE_LATENT, generator=gen)
        names, axes = (["latent_sample"], ["sample"]), {"latent_sample": latents, "sample": pixels}
    return _export_part(_VaeIO(vae, half), (x,), out_dir, opset, dtype, *names, axes)


def _place_unet(export, out_dir: Path) -> dict:
    """The slim UNet's export in ``out_dir`` with its output named ``out_sample``: the graph (read without its
    weights) is rewritten only when the name differs; the weights file is copied."""
    import onnx

    out_dir.mkdir(parents=True)
    model = onnx.load(str(export.onnx_path), load_external_data=False)
    (old,) = [o.name for o in model.graph.output]
    if old != UNET_OUTPUT:
        for node in model.graph.node:
            node.output[:] = [UNET_OUTPUT if n == old else n for n in node.output]
            node.input[:] = [UNET_OUTPUT if n == old else n for n in node.input]
        for info in model.graph.value_info:
            if info.name == old:
                info.name = UNET_OUTPUT
        model.graph.output[0].name = UNET_OUTPUT
    onnx.save_model(model, str(out_dir / MODEL_FILE))  # weights stay external: the proto points at model.onnx_data
    # a copy: onnx's checker refuses a hard-linked (or symlinked) external data file as a possible attack
    shutil.copyfile(export.data_path, out_dir / DATA_FILE)
    onnx.checker.check_model(str(out_dir / MODEL_FILE))
    io = _graph_io(model)
    if [e["name"] for e in io["outputs"]] != [UNET_OUTPUT]:
        raise ArtifactError(f"the slim UNet export {export.folder} has outputs {[e['name'] for e in io['outputs']]}",
                            "re-export it (slimexport build)")
    # the weights file is the export's own, hashed when it was written (and checked by read_export)
    return {"files": {MODEL_FILE: sha256_file(out_dir / MODEL_FILE), DATA_FILE: export.data_sha256}, **io}
