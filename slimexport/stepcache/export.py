"""ONNX export of a cached UNet pair, and a denoising loop that runs any engines of it by a schedule.

Folder ``OUT`` (:func:`export_cache_pair`)::

    OUT/full/     model.onnx + model.onnx_data + export.json   sample, timestep, encoder_hidden_states -> latent, cache
    OUT/shallow/  model.onnx + model.onnx_data + export.json   sample, timestep, encoder_hidden_states, cache -> latent
    OUT/pair.json depth, the cache's channels and downsampling factor, sha256 of every file

The I/O is the TensorRT demo's (:mod:`slimexport.engines.onnx_export`: opset 19, dynamic ``2B``/``H``/``W``, the
timestep on an axis ``Bt`` of its own, ``[1]`` or ``[2B]``) plus ``cache [2B, C, Hc, Wc]`` with ``Hc = H / scale``
(``scale`` in ``pair.json``; dynamic axes ``Hc``/``Wc``). Each graph goes through the same steps as
``export_unet_onnx`` (its helpers: graph cleanup, constant folding, one external-data file, checker, standard-op
check, I/O check); in the shallow graph the skipped blocks are absent (their weights too), and so is the last
shallow down block's unused downsampler (dead code, removed by the cleanup).

Each folder loads as an ordinary engine (``build_engine("onnxruntime", OUT / "full")``): the engine interface
takes any input and output names. :class:`CachedEngineUNet` follows a plan over a full and a shallow engine and
can stand in for the UNet in :func:`slimexport.calibrate.runner.denoise` (see :func:`sample_with_engines`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from slimexport.artifacts import read_json, write_json
from slimexport.engines.base import BATCH_AXIS, CONTEXT, SAMPLE, TIMESTEP, io_spec_for_unet
from slimexport.engines.onnx_export import (
    MAX_OPSET,
    MIN_OPSET,
    TRACE_TIMESTEP,
    default_shapes,
    export_traced,
    read_export,
)
from slimexport.errors import ArtifactError, UsageError
from slimexport.stepcache.schedule import CachePlan, Schedule, ScheduleCursor
from slimexport.stepcache.unet import (
    FullPath,
    ShallowPath,
    SplitUNet,
    cache_channels,
    cache_scale,
    check_depth,
)

log = logging.getLogger(__name__)

CACHE = "cache"
CACHE_H, CACHE_W = "Hc", "Wc"
FULL_DIR, SHALLOW_DIR = "full", "shallow"
PAIR_FILE = "pair.json"
PAIR_FORMAT = "slimexport.stepcache.pair/1"


def pair_io_specs(unet, depth: int, *, dtype: str = "fp32", output_name: str = "latent", seq_len: int = 77,
                  timestep_dtype: str = "float32") -> tuple[dict, dict]:
    """The I/O specs of the full and the shallow graph (as :func:`slimexport.engines.base.unet_io_spec`, plus ``cache``)."""
    base = io_spec_for_unet(unet, dtype=dtype, output_name=output_name, seq_len=seq_len, broadcast_timestep=True,
                            timestep_dtype=timestep_dtype)
    act = next(e["dtype"] for e in base["inputs"] if e["name"] == SAMPLE)
    cache = {"name": CACHE, "dtype": act, "shape": [BATCH_AXIS, cache_channels(unet, depth), CACHE_H, CACHE_W],
             "scale": cache_scale(unet, depth)}  # Hc = ceil(H / scale): what an engine's shape profile needs
    axes = {BATCH_AXIS: 0, CACHE_H: 2, CACHE_W: 3}
    full = {"inputs": base["inputs"], "outputs": base["outputs"] + [cache],
            "dynamic_axes": {**base["dynamic_axes"], CACHE: axes}}
    shallow = {"inputs": base["inputs"] + [cache], "outputs": base["outputs"],
               "dynamic_axes": {**base["dynamic_axes"], CACHE: axes}}
    return full, shallow


def export_cache_pair(unet, out_dir: str | Path, depth: int, *, opset: int = 19, dtype: str = "fp32",
                      output_name: str = "latent", sample_shape: tuple[int, int, int, int] | None = None,
                      context_shape: tuple[int, int, int] | None = None, timestep_dtype: str = "float32") -> dict:
    """Export the full and the shallow path of a dense or slim UNet at cache ``depth`` to ``out_dir``.

    Args: as :func:`slimexport.engines.onnx_export.export_unet_onnx`, plus ``depth`` (1..number of down blocks).

    Returns:
        ``pair.json``'s content: ``{"format", "depth", "cache_channels", "cache_scale", "full": export record,
        "shallow": export record}`` (records as ``ExportResult.to_dict``).

    Raises:
        UsageError: bad arguments or depth. ArtifactError: a graph fails the checks.
    """
    from slimexport.engines.torch_runner import converted_copy

    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise UsageError(f"opset={opset!r} is not supported", f"use an integer in [{MIN_OPSET}, {MAX_OPSET}] (19 is the default)")
    if dtype not in ("fp32", "fp16"):
        raise UsageError(f"dtype={dtype!r} is not supported for ONNX export", "use fp32 or fp16")
    check_depth(unet, depth)
    sample_shape, context_shape = default_shapes(unet, sample_shape, context_shape)
    full_spec, shallow_spec = pair_io_specs(unet, depth, dtype=dtype, output_name=output_name, seq_len=context_shape[1],
                                            timestep_dtype=timestep_dtype)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    module = converted_copy(unet.eval(), dtype=torch_dtype, fp32_norms=dtype == "fp16")
    device = next(module.parameters()).device
    split = SplitUNet(module, depth).eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(sample_shape, generator=gen).to(device, torch_dtype)
    t = torch.full((sample_shape[0],), TRACE_TIMESTEP, dtype=torch_dtype if timestep_dtype == "sample" else torch.float32,
                   device=device)
    context = torch.randn(context_shape, generator=gen).to(device, torch_dtype)
    with torch.no_grad():
        _, cache = split.full(sample, t, context)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = export_traced(FullPath(split).eval(), (sample, t, context), full_spec, out_dir / FULL_DIR, opset, dtype)
    shallow = export_traced(ShallowPath(split).eval(), (sample, t, context, cache), shallow_spec, out_dir / SHALLOW_DIR,
                            opset, dtype)
    record = {"format": PAIR_FORMAT, "depth": depth, "cache_channels": cache_channels(unet, depth),
              "cache_scale": cache_scale(unet, depth), "full": full.to_dict(), "shallow": shallow.to_dict()}
    write_json(out_dir / PAIR_FILE, record)
    log.info("exported the step-cache pair %s (depth %d): full %.1f MB, shallow %.1f MB", out_dir, depth,
             full.size_bytes / 1e6, shallow.size_bytes / 1e6)
    return record


def read_pair(folder: str | Path, verify: bool = False) -> dict:
    """``pair.json`` of an exported pair; ``verify`` re-hashes both graphs' files.

    Raises:
        ArtifactError: missing, altered or of another format.
    """
    folder = Path(folder)
    rec = read_json(folder / PAIR_FILE, "step-cache pair record")
    if not isinstance(rec, dict) or rec.get("format") != PAIR_FORMAT:
        raise ArtifactError(f"{folder} is not a step-cache pair (format {PAIR_FORMAT} expected)",
                            "re-export it (slimexport.stepcache.export.export_cache_pair)")
    if verify:
        for sub in (FULL_DIR, SHALLOW_DIR):
            read_export(folder / sub, verify=True)
    return rec


class EngineUNet:
    """An engine (``run(feeds) -> outputs``, UNet I/O) called like a diffusers UNet, for the sampler of
    :func:`slimexport.calibrate.runner.denoise`: ``(sample, t, encoder_hidden_states=...) -> (latent,)`` on torch
    tensors (copied to host arrays and back)."""

    def __init__(self, engine, dtype: str = "float32"):
        self.engine = engine
        self.np_dtype = np.dtype(dtype)
        self.output_name = engine.io_spec["outputs"][0]["name"]

    def _feeds(self, sample, timestep, context) -> dict[str, np.ndarray]:
        t = timestep.reshape(-1)[:1] if isinstance(timestep, torch.Tensor) else torch.tensor([float(timestep)])
        return {SAMPLE: sample.detach().cpu().numpy().astype(self.np_dtype, copy=False),
                TIMESTEP: t.detach().cpu().numpy().astype(np.float32),
                CONTEXT: context.detach().cpu().numpy().astype(self.np_dtype, copy=False)}

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict: bool = False):
        out = self.engine.run(self._feeds(sample, timestep, encoder_hidden_states))
        return (torch.from_numpy(out[self.output_name]).to(sample.device, sample.dtype),)


class CachedEngineUNet(EngineUNet):
    """A full and a shallow engine of one UNet following ``plan`` call by call (a new generation is detected as in
    :class:`~slimexport.stepcache.schedule.ScheduleCursor`); the cache stays a host array between calls.

    Args:
        full, shallow: engines of ``OUT/full`` and ``OUT/shallow`` (any backend).
        plan: a :class:`CachePlan` or :class:`Schedule` of the pair's depth.
    """

    def __init__(self, full, shallow, plan: CachePlan | Schedule, dtype: str = "float32"):
        super().__init__(full, dtype)
        self.shallow = shallow
        self.cursor = ScheduleCursor(plan)
        self._cache: np.ndarray | None = None

    @property
    def history(self) -> str:
        return self.cursor.history

    def reset(self) -> None:
        self.cursor.reset()
        self._cache = None

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict: bool = False):
        from slimexport.stepcache.wrapper import timestep_value

        feeds = self._feeds(sample, timestep, encoder_hidden_states)
        if self.cursor.next(timestep_value(timestep), (tuple(sample.shape), str(sample.dtype))):
            out = self.engine.run(feeds)
            self._cache = out[CACHE]
        else:
            out = self.shallow.run({**feeds, CACHE: self._cache})
        return (torch.from_numpy(out[self.output_name]).to(sample.device, sample.dtype),)


def sample_with_engines(unet_like, bundle, cond: torch.Tensor, uncond: torch.Tensor | None, latents: torch.Tensor,
                        num_steps: int, guidance_scale: float) -> torch.Tensor:
    """A whole denoising run (the calibration sampler, :func:`slimexport.calibrate.runner.denoise`) with an
    :class:`EngineUNet` or :class:`CachedEngineUNet`; returns the final latents. Resets a cached one first."""
    from slimexport.calibrate.runner import denoise

    if hasattr(unet_like, "reset"):
        unet_like.reset()
    return denoise(unet_like, bundle.make_scheduler(), cond, uncond, latents, num_steps, guidance_scale)

