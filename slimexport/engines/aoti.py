"""The AOTInductor backend: the UNet exported with ``torch.export``, compiled ahead of time, run from a package.

- Export: ``torch.export`` of :class:`~slimexport.engines.torch_runner.UNetIO` (the engines' I/O) with a
  dynamic batch axis ``2B`` and dynamic height/width wherever the profile gives a range. Heights and widths
  are declared as ``latent_multiple * Dim`` (the UNet's total downsampling factor), so diffusers' check that
  the size divides by the upsampling factor is decided at export time instead of specialising the size.
  Should a model still refuse dynamic height/width, the package falls back to the profile's optimal size
  (``opt_height`` x ``opt_width``), says so in a warning, and records the reason in its sidecar; the engine
  then refuses other sizes. The slim attention (:class:`~slimexport.slim.attention.SlimAttnProcessor`,
  ``rank_qk != rank_vo`` and the dense scale) exports as the kernels' torch reference (the dispatch takes it while
  ``torch.compiler.is_compiling()``): SDPA, on the CPU with q/k/v zero-padded to one head size so that the
  compiled package keeps the fused attention kernel.
- Compile: ``torch._inductor.aoti_compile_and_package`` for the build device (CPU: C++/OpenMP kernels, needs a
  C++ compiler; CUDA: Triton kernels for this GPU's compute capability), with a heartbeat on stderr.
- Files: ``unet.cpu.torch2.13.0.pt2`` / ``unet.cuda.sm90.torch2.11.0.pt2`` plus a JSON sidecar (``.json``
  beside it) recording device type, compute capability or CPU vector extensions, the full torch version, the
  source model's digest, dtype, and the shapes compiled for.
- Reuse: a second build with the same model digest, dtype, profile, slimexport code (:func:`code_digest`), device
  and torch version loads the package instead of compiling (by content, never by file existence alone).
- Refusal: loading a package compiled for another device type, compute capability, CPU vector extensions or
  torch version raises :class:`~slimexport.errors.IncompatibleArtifactError` naming each difference.

The naming, compatibility check, shape plan and reuse decision are pure functions, testable without compiling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slimexport.artifacts import TMP_PREFIX, ensure_dir, read_json, sha256_file, write_json
from slimexport.engines.base import (
    CONTEXT,
    SAMPLE,
    TIMESTEP,
    Engine,
    EngineConfig,
    EngineProfile,
    io_spec_for_unet,
    refuse_incompatible,
    sidecar_for,
    sm_tag,
    unet_from_source,
)
from slimexport.engines.torch_runner import exact_fp32
from slimexport.errors import ArtifactError, IncompatibleArtifactError, UsageError
from slimexport.models import arch

log = logging.getLogger(__name__)

PACKAGE_STEM = "unet"
PACKAGE_SUFFIX = ".pt2"
SIDECAR_FORMAT = "slimexport.aoti/1"
HEARTBEAT_SECONDS = 10.0  # how often a running compile reports its elapsed time on stderr
CACHE_ENV = "SLIMEXPORT_AOTI_CACHE"  # default package folder root when EngineConfig.cache_dir is None
# Inductor settings the packages are compiled with (recorded in the sidecar and part of the reuse key).
INDUCTOR_CONFIGS: dict[str, Any] = {}
# CPU features a CPU package may be compiled for (``/proc/cpuinfo`` flag names). Inductor picks its vector ISA
# (AVX2, AVX-512, AMX, NEON/SVE) from these, so a package runs only where all of its compile machine's are present.
CPU_FEATURES = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2",
)
SEQ_AXIS_STATIC = 77  # text tokens: encoder_hidden_states' sequence axis is compiled static (default: CLIP's 77)


# ---------------------------------------------------------------- pure parts: names, compatibility, reuse


@dataclass(frozen=True)
class Target:
    """What a package is tied to.

    Attributes:
        device_type: ``cpu`` or ``cuda``.
        torch_version: the full ``torch.__version__`` (``2.13.0+cpu``): the package's runtime ABI.
        compute_capability: CUDA ``major.minor`` (``9.0``); ``None`` on CPU.
        cpu_features: CPU: the :data:`CPU_FEATURES` this CPU has (sorted); ``()`` on CUDA.
        arch: CPU: ``platform.machine()`` (``x86_64``, ``aarch64``); ``None`` on CUDA.
        device_name: the GPU's or CPU's model name (informative, not checked).
    """

    device_type: str
    torch_version: str
    compute_capability: str | None = None
    cpu_features: tuple[str, ...] = ()
    arch: str | None = None
    device_name: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_features"] = list(self.cpu_features)
        return d


def torch_tag(torch_version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"torch2.13.0"`` (the public version; the local part stays in the sidecar)."""
    public = str(torch_version).split("+", 1)[0]
    parts = public.split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise UsageError(f"torch version {torch_version!r} is not of the form major.minor[.patch]", "pass e.g. '2.13.0'")
    return "torch" + public


def package_filename(target: Target, stem: str = PACKAGE_STEM) -> str:
    """``unet.cpu.torch2.13.0.pt2`` or ``unet.cuda.sm90.torch2.11.0.pt2``: which device and torch can load it."""
    if target.device_type == "cuda":
        if not target.compute_capability:
            raise UsageError("a CUDA package name needs the compute capability", "pass Target(compute_capability='9.0')")
        device = f"cuda.{sm_tag(target.compute_capability)}"
    elif target.device_type == "cpu":
        device = "cpu"
    else:
        raise UsageError(f"device type {target.device_type!r} is not supported by the aoti backend", "use cpu or cuda")
    return f"{stem}.{device}.{torch_tag(target.torch_version)}{PACKAGE_SUFFIX}"


def sidecar_path(package: str | Path) -> Path:
    """``unet.cpu.torch2.13.0.pt2`` -> ``unet.cpu.torch2.13.0.json``."""
    return sidecar_for(package, PACKAGE_SUFFIX)


def incompatibilities(built: Mapping[str, Any], here: Target) -> list[str]:
    """What differs between the target a package was compiled for (its sidecar) and this one; empty: loadable."""
    out = []
    if built.get("device_type") != here.device_type:
        return [f"device {built.get('device_type')} vs {here.device_type} here"]
    if here.device_type == "cuda" and built.get("compute_capability") != here.compute_capability:
        out.append(f"compute capability {built.get('compute_capability')} vs {here.compute_capability} here")
    if here.device_type == "cpu":
        if built.get("arch") != here.arch:
            out.append(f"CPU architecture {built.get('arch')} vs {here.arch} here")
        missing = sorted(set(built.get("cpu_features") or ()) - set(here.cpu_features))
        if missing:
            out.append(f"CPU features {', '.join(missing)} missing here")
    if built.get("torch_version") != here.torch_version:
        out.append(f"torch {built.get('torch_version')} vs {here.torch_version} here")
    return out


def check_compatible(built: Mapping[str, Any], here: Target, package: str | Path = "the package") -> None:
    """Refuse a package compiled for another device type, compute capability, CPU or torch version.

    Raises:
        IncompatibleArtifactError: naming each difference.
    """
    refuse_incompatible(incompatibilities(built, here), f"AOTInductor package {package} was compiled for another machine",
                        "recompile it here (slimexport build --backend aoti); packages are tied to the device and the "
                        "torch version")


def dynamic_plan(profile: EngineProfile) -> dict[str, bool]:
    """Which axes are compiled dynamic: those where the profile gives a range (``min < max``)."""
    return {axis: getattr(profile, f"min_{axis}") < getattr(profile, f"max_{axis}") for axis in ("batch", "height", "width")}


def trace_sizes(profile: EngineProfile) -> dict[str, int]:
    """The sizes the export traces with: the optimal ones, moved off 1 on dynamic axes (``torch.export``
    specialises a dimension traced at size 1; for height/width: a multiplier of ``latent_multiple`` of 1)."""
    plan = dynamic_plan(profile)
    out = {}
    for axis in ("batch", "height", "width"):
        lo, opt, hi = (getattr(profile, f"{k}_{axis}") for k in ("min", "opt", "max"))
        unit = 1 if axis == "batch" else profile.latent_multiple
        if plan[axis] and opt == unit:
            opt = min(hi, 2 * unit)
        out[axis] = opt
    return out


def accepted_profile(profile: EngineProfile, dynamic: Mapping[str, bool]) -> EngineProfile:
    """The shapes a package accepts: ``profile`` with every axis compiled static pinned to its traced size."""
    sizes = trace_sizes(profile)
    changes = {}
    for axis in ("batch", "height", "width"):
        if not dynamic.get(axis, False):
            changes.update({f"min_{axis}": sizes[axis], f"opt_{axis}": sizes[axis], f"max_{axis}": sizes[axis]})
        elif getattr(profile, f"opt_{axis}") != sizes[axis]:
            changes[f"opt_{axis}"] = sizes[axis]
    return profile.replace(**changes) if changes else profile


# The slimexport modules whose code shapes the traced graph (slim layers, kernel references, the export itself): a
# package compiled by other code is not reused, even from the same weights.
TRACED_CODE = ("slim", "kernels", "engines/aoti.py", "_version.py")


def code_digest() -> str:
    """sha256 of the :data:`TRACED_CODE` sources (file names and bytes)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in TRACED_CODE:
        path = root / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _differences(sidecar: Mapping[str, Any], *, source_sha256: str, profile: EngineProfile, dtype: str,
                 inductor_configs: Mapping[str, Any] | None, code_sha256: str | None, seq_len: int) -> list[str]:
    """Which of a package's inputs differ from these (the machine aside)."""
    configs = dict(INDUCTOR_CONFIGS if inductor_configs is None else inductor_configs)
    return [k for k, same in (
        ("model weights", sidecar.get("source_sha256") == source_sha256),
        ("profile", sidecar.get("profile") == profile.to_dict()),
        ("dtype", sidecar.get("dtype") == dtype),
        ("text length", sidecar.get("seq_len", SEQ_AXIS_STATIC) == seq_len),
        ("inductor settings", sidecar.get("inductor_configs") == configs),
        ("slimexport code", sidecar.get("code_sha256") == (code_sha256 or code_digest())),
    ) if not same]


def reusable(sidecar: Mapping[str, Any], *, source_sha256: str, profile: EngineProfile, dtype: str, here: Target,
             inductor_configs: Mapping[str, Any] | None = None, code_sha256: str | None = None,
             seq_len: int = SEQ_AXIS_STATIC) -> bool:
    """True when a package on disk was compiled from this model (digest), dtype, profile, text length, inductor
    settings and slimexport code (:func:`code_digest`, ``None``: this code), for this device and torch version."""
    return (sidecar.get("format") == SIDECAR_FORMAT and not incompatibilities(sidecar, here)
            and not _differences(sidecar, source_sha256=source_sha256, profile=profile, dtype=dtype,
                                 inductor_configs=inductor_configs, code_sha256=code_sha256, seq_len=seq_len))


def reuse_decision(package: Path, sidecar: Mapping[str, Any] | None, *, package_sha256: str | None,
                   source_sha256: str, profile: EngineProfile, dtype: str, here: Target,
                   inductor_configs: Mapping[str, Any] | None = None, code_sha256: str | None = None,
                   seq_len: int = SEQ_AXIS_STATIC) -> tuple[bool, str]:
    """``(reuse?, why)`` for the package at ``package``: the whole decision, including a missing or altered file."""
    if sidecar is None:
        return False, f"no package {package.name} yet"
    if sidecar.get("format") != SIDECAR_FORMAT:
        return False, f"{package.name} has sidecar format {sidecar.get('format')!r}, not {SIDECAR_FORMAT!r}"
    diffs = incompatibilities(sidecar, here)
    if diffs:
        return False, f"{package.name} was compiled for another machine ({'; '.join(diffs)})"
    what = _differences(sidecar, source_sha256=source_sha256, profile=profile, dtype=dtype,
                        inductor_configs=inductor_configs, code_sha256=code_sha256, seq_len=seq_len)
    if what:
        return False, f"{package.name} was compiled from another {', '.join(what)}"
    if package_sha256 is None:
        return False, f"{package.name} is missing"
    if sidecar.get("package_sha256") != package_sha256:
        return False, f"{package.name} does not match its sidecar's sha256"
    return True, f"{package.name} matches the model, dtype, profile, slimexport code, device and torch version"


def model_digest(unet: nn.Module) -> str:
    """sha256 of what a package is compiled from: the UNet's config, its attention processors (class and
    scale) and every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    # Private keys (``_use_default_values``: a list in set order, ``_diffusers_version``...) do not define the model.
    config = {k: v for k, v in dict(getattr(unet, "config", {}) or {}).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    processors = getattr(unet, "attn_processors", None) or {}
    h.update(json.dumps({k: [type(p).__name__, getattr(p, "scale", None)] for k, p in sorted(processors.items())},
                        default=str).encode())
    for name, t in sorted(unet.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, without a copy
    return h.hexdigest()


def default_cache_dir(source_sha256: str) -> Path:
    """``$SLIMEXPORT_AOTI_CACHE/<digest[:16]>`` (default ``~/.cache/slimexport/aoti/...``): one folder per model,
    so packages of different models never share a file name."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimexport" / "aoti"
    return Path(root) / source_sha256[:16]


@contextlib.contextmanager
def heartbeat(label: str, every: float = HEARTBEAT_SECONDS, stream=None) -> Iterator[None]:
    """Print ``<label>: N s elapsed`` to ``stream`` (default stderr) every ``every`` seconds while the block runs."""
    out = stream if stream is not None else sys.stderr
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not stop.wait(every):
            print(f"{label}: {time.perf_counter() - t0:.0f} s elapsed", file=out, flush=True)

    thread = threading.Thread(target=beat, name="aoti-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- device, export and compile


def cpu_features() -> tuple[str, ...]:
    """The :data:`CPU_FEATURES` listed in ``/proc/cpuinfo`` (empty where it is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(sorted(flag for flag in CPU_FEATURES if flag in flags))
    except OSError:
        pass
    return ()


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda:N`` (``cuda`` -> the current GPU), refusing CUDA when PyTorch sees none."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device} was asked for but PyTorch sees no CUDA GPU",
                             "pass --engine-device cpu or install a CUDA build of PyTorch")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        raise UsageError(f"the aoti backend does not run on {device}", "use cpu or cuda[:N]")
    return dev


def current_target(device: str | torch.device = "cpu") -> Target:
    """The device type, compute capability or CPU features, and the torch version of this process."""
    from slimexport.engines.torch_runner import device_name

    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return Target("cuda", torch.__version__, compute_capability=f"{major}.{minor}",
                      device_name=torch.cuda.get_device_name(dev))
    return Target("cpu", torch.__version__, cpu_features=cpu_features(), arch=platform.machine(),
                  device_name=device_name("cpu"))


def check_compiler() -> None:
    """AOTInductor builds a C++ shared library (the CPU kernels, or the wrapper around CUDA kernels): refuse early,
    with the fix, when no C++ compiler is found."""
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        raise UsageError("the aoti backend compiles C++ and no C++ compiler was found (g++, clang++ or $CXX)",
                         "install one (e.g. apt-get install g++) or use --backend torch")


def _example_inputs(in_channels: int, context_dim: int, sizes: Mapping[str, int], dtype: torch.dtype,
                    device: torch.device, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, h, w = sizes["batch"], sizes["height"], sizes["width"]
    sample = torch.randn(b, in_channels, h, w, generator=g).to(device, dtype)
    timestep = torch.linspace(1.0, 999.0, b).to(device)  # float32 always (see unet_io_spec)
    context = torch.randn(b, seq_len, context_dim, generator=g).to(device, dtype)
    return sample, timestep, context


def _dynamic_shapes(profile: EngineProfile, dynamic: Mapping[str, bool], scaled: Mapping[str, int] | None = None) -> dict:
    """``dynamic_shapes`` for ``torch.export``; ``scaled``: further inputs (name -> scale) of height and width the
    sample's over that scale (the same symbols: ``(multiple / scale) · cells``), e.g. a step-cache ``cache``."""
    from torch.export import Dim

    m = profile.latent_multiple
    batch = Dim("batch", min=profile.min_batch, max=profile.max_batch) if dynamic["batch"] else None
    # Heights/widths as multiples of the downsampling factor: the upsampling blocks' size checks then hold symbolically.
    cells = {axis: Dim(f"{axis}_cells", min=getattr(profile, f"min_{axis}") // m, max=getattr(profile, f"max_{axis}") // m)
             for axis in ("height", "width") if dynamic[axis]}
    hw = {axis: m * d for axis, d in cells.items()}
    sample = {k: v for k, v in ((0, batch), (2, hw.get("height")), (3, hw.get("width"))) if v is not None}
    out = {SAMPLE: sample or None, TIMESTEP: {0: batch} if batch is not None else None,
           CONTEXT: {0: batch} if batch is not None else None}
    for name, scale in (scaled or {}).items():
        per = m // scale
        dims = ((0, batch), *((i, per * cells[a] if per > 1 else cells[a]) for i, a in ((2, "height"), (3, "width"))
                              if a in cells))
        out[name] = {k: v for k, v in dims if v is not None} or None
    return out


def export_unet(model: nn.Module, profile: EngineProfile, *, in_channels: int, context_dim: int, dtype: torch.dtype,
                device: torch.device, seq_len: int = SEQ_AXIS_STATIC, wrap: Callable[[nn.Module], nn.Module] | None = None,
                extra: Callable[[nn.Module, tuple], tuple] | None = None, scaled: Mapping[str, int] | None = None):
    """``torch.export`` of ``UNetIO(model)`` with the profile's dynamic axes.

    ``wrap``: export ``wrap(model)`` instead (same first three inputs, e.g. a step-cache path); ``extra(wrapped,
    args)``: example tensors of its further inputs; ``scaled``: those inputs' names and spatial scales (their height
    and width are the sample's over it, with the same symbols).

    Returns:
        ``(exported_program, dynamic, fallback_reason)``: ``dynamic`` says which axes are dynamic; when the model
        refused dynamic height/width they are static at the traced (optimal) size and ``fallback_reason`` says why.
    """
    from torch._dynamo.exc import UserError
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    from slimexport.engines.torch_runner import UNetIO

    wrapped = (wrap(model) if wrap is not None else UNetIO(model)).eval()
    args = _example_inputs(in_channels, context_dim, trace_sizes(profile), dtype, device, seq_len)
    if extra is not None:
        with torch.no_grad():
            args = (*args, *extra(wrapped, args))
    dynamic = dynamic_plan(profile)

    def shapes(dyn):
        return _dynamic_shapes(profile, dyn, scaled)

    try:
        with torch.no_grad():
            return torch.export.export(wrapped, args, dynamic_shapes=shapes(dynamic)), dynamic, None
    except (UserError, ConstraintViolationError) as err:
        if not (dynamic["height"] or dynamic["width"]):
            raise
        reason = f"dynamic height/width refused by torch.export ({str(err).splitlines()[0][:300]})"
        sizes = trace_sizes(profile)
        log.warning("%s; compiling for %dx%d latent cells only", reason, sizes["height"], sizes["width"])
        dynamic = {**dynamic, "height": False, "width": False}
        with torch.no_grad():
            return torch.export.export(wrapped, args, dynamic_shapes=shapes(dynamic)), dynamic, reason


@dataclass(frozen=True)
class Variant:
    """A module made from the UNet to compile in its place (same first inputs: sample, timestep, context).

    Attributes:
        tag: names it (package stem, cache key); io_spec: its inputs and outputs; wrap: builds it from the UNet;
        extra: example tensors of its further inputs from ``(wrapped, args)``; scaled: those inputs' spatial scales.
    """

    tag: str
    io_spec: dict
    wrap: Callable[[nn.Module], nn.Module]
    extra: Callable[[nn.Module, tuple], tuple] | None = None
    scaled: Mapping[str, int] | None = None

    def export_args(self) -> dict:
        return {"wrap": self.wrap, "extra": self.extra, "scaled": self.scaled}


@dataclass(frozen=True)
class AotiBuildResult:
    package: Path
    sidecar: dict
    reused: bool


def _compile_package(exported, package: Path, label: str) -> float:
    """Compile ``exported`` into ``package`` (written beside it, then renamed into place); returns seconds."""
    import torch._inductor

    tmp = package.with_name(f"{TMP_PREFIX}{os.getpid()}-{package.name}")  # aoti wants a name ending in .pt2
    t0 = time.perf_counter()
    try:
        with heartbeat(label):
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp),
                                                     inductor_configs=dict(INDUCTOR_CONFIGS))
        os.replace(tmp, package)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return time.perf_counter() - t0


def build_aoti_package(unet: nn.Module, out_dir: str | Path | None, profile: EngineProfile, *, dtype: str = "fp32",
                       device: str = "cpu", stem: str = PACKAGE_STEM, rebuild: bool = False,
                       seq_len: int = SEQ_AXIS_STATIC, variant: Variant | None = None) -> AotiBuildResult:
    """Compile (or reuse) an AOTInductor package of ``unet`` for ``profile`` on ``device``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (dense or slim); weights never modified (put in eval mode; a converted copy is compiled
            when dtype or device differ).
        out_dir: where ``<stem>.<device>.torch<ver>.pt2`` and its ``.json`` sidecar go; ``None``:
            :func:`default_cache_dir` of the model's digest.
        profile: the shapes to accept (dynamic where min < max).
        dtype: ``fp32`` or ``fp16`` weights and activations (timestep stays fp32).
        rebuild: compile even if a matching package exists.
        seq_len: text tokens of ``encoder_hidden_states`` (a static axis of the package).
        variant: compile a module made from the UNet instead (:class:`Variant`: e.g. one path of its step-cache
            pair, ``slimexport.stepcache.engines``), keyed apart from the UNet's own package.

    Returns:
        :class:`AotiBuildResult` (``reused`` is True when nothing was compiled).
    """
    from slimexport.engines.base import NP_DTYPES
    from slimexport.engines.torch_runner import TORCH_DTYPES, converted_copy

    if dtype not in NP_DTYPES:
        raise UsageError(f"dtype={dtype!r} is not supported by the aoti backend", "use fp32 or fp16")
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise UsageError(f"seq_len={seq_len!r} is invalid", "pass the text encoder's token count (77 for CLIP)")
    dev = resolve_device(device)
    here = current_target(dev)
    t0 = time.perf_counter()
    source_sha = model_digest(unet)
    if variant is not None:
        source_sha = hashlib.sha256(f"{source_sha}|{variant.tag}".encode()).hexdigest()
        stem = f"{stem}-{variant.tag}"
    digest_seconds = time.perf_counter() - t0
    code_sha = code_digest()
    folder = Path(out_dir) if out_dir is not None else default_cache_dir(source_sha)
    package = folder / package_filename(here, stem)
    side = sidecar_path(package)
    old = read_json(side, "AOTInductor package sidecar") if side.exists() else None
    decision, why = reuse_decision(package, old, package_sha256=sha256_file(package) if package.exists() else None,
                                   source_sha256=source_sha, profile=profile, dtype=dtype, here=here, code_sha256=code_sha,
                                   seq_len=seq_len)
    if decision and not rebuild:
        log.info("reusing %s: %s", package, why)
        return AotiBuildResult(package, old, True)
    log.info("compiling %s: %s", package, "rebuild asked for" if decision else why)
    check_compiler()
    ensure_dir(folder)
    io_spec = io_spec_for_unet(unet, dtype=dtype, seq_len=seq_len) if variant is None else variant.io_spec
    model = converted_copy(unet.eval(), device=dev, dtype=TORCH_DTYPES[dtype])
    cfg = unet.config
    label = f"[aoti] compiling {folder.name}/{package.name} ({here.device_type})"
    print(f"{label}: exporting with torch.export", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with heartbeat(label + " (export)"):
        exported, dynamic, fallback = export_unet(model, profile, in_channels=int(cfg.in_channels),
                                                  context_dim=arch.context_dim(cfg),
                                                  dtype=TORCH_DTYPES[dtype], device=dev, seq_len=seq_len,
                                                  **(variant.export_args() if variant is not None else {}))
    export_seconds = time.perf_counter() - t0
    print(f"{label}: exported in {export_seconds:.0f} s; compiling with AOTInductor (minutes)", file=sys.stderr, flush=True)
    compile_seconds = _compile_package(exported, package, label)
    print(f"{label}: done in {compile_seconds:.0f} s", file=sys.stderr, flush=True)
    del exported, model
    accepts = accepted_profile(profile, dynamic)
    sidecar = {
        "format": SIDECAR_FORMAT, **here.to_dict(), "package": package.name, "package_sha256": sha256_file(package),
        "source_sha256": source_sha, "code_sha256": code_sha, "dtype": dtype, "seq_len": seq_len, "profile": profile.to_dict(), "dynamic": dynamic,
        "accepts": accepts.to_dict(), "traced_sizes": trace_sizes(profile), "dynamic_fallback": fallback,
        "inductor_configs": dict(INDUCTOR_CONFIGS), "io_spec": io_spec, "digest_seconds": round(digest_seconds, 2),
        "export_seconds": round(export_seconds, 1), "compile_seconds": round(compile_seconds, 1),
        "variant": variant.tag if variant is not None else None,
    }
    write_json(side, sidecar)
    return AotiBuildResult(package, sidecar, False)


# ---------------------------------------------------------------- the engine


class AotiEngine(Engine):
    """A compiled AOTInductor package behind the engine interface.

    Attributes:
        package: the ``.pt2`` file; ``sidecar``: its JSON record; ``files``: both (for manifests).
        reused: whether :func:`create` found the package already compiled (``None`` when loaded directly).
    """

    name = "aoti"

    def __init__(self, package: str | Path, cfg: EngineConfig | None = None, reused: bool | None = None):
        import torch._inductor

        cfg = cfg or EngineConfig()
        package = Path(package)
        side = sidecar_path(package)
        if not package.exists() or not side.exists():
            raise ArtifactError(f"AOTInductor package {package} or its sidecar {side.name} is missing",
                                "compile it (slimexport build --backend aoti)")
        self.sidecar = read_json(side, "AOTInductor package sidecar")
        if self.sidecar.get("format") != SIDECAR_FORMAT:
            raise IncompatibleArtifactError(f"{side} has format {self.sidecar.get('format')!r}, this slimexport reads "
                                            f"{SIDECAR_FORMAT!r}", "recompile the package (slimexport build --backend aoti)")
        dev = resolve_device(cfg.device)
        self.here = current_target(dev)
        check_compatible(self.sidecar, self.here, package)
        if self.sidecar.get("package_sha256") != sha256_file(package):
            raise ArtifactError(f"AOTInductor package {package} does not match its sidecar's sha256",
                                "recompile it (delete it and rerun slimexport build --backend aoti)")
        if cfg.dtype != self.sidecar["dtype"]:
            raise UsageError(f"package {package.name} was compiled for {self.sidecar['dtype']}, the config asks for {cfg.dtype}",
                             f"pass dtype={self.sidecar['dtype']!r} or compile a {cfg.dtype} package")
        self.cfg = cfg
        self.package = package
        self.files = (package, side)
        self.reused = reused
        self.device = str(dev)
        self.exact = dev.type == "cuda" and self.sidecar["dtype"] == "fp32"
        self.output_name = cfg.output_name
        spec = self.sidecar["io_spec"]
        out = [{**e, "name": cfg.output_name} if i == 0 else e for i, e in enumerate(spec["outputs"])]  # latent[, cache]
        self.io_spec = {"inputs": spec["inputs"], "outputs": out,
                        "dynamic_axes": {**{k: v for k, v in spec["dynamic_axes"].items() if k != spec["outputs"][0]["name"]},
                                         cfg.output_name: spec["dynamic_axes"][spec["outputs"][0]["name"]]}}
        accepts = EngineProfile.from_dict(self.sidecar["accepts"])
        self.profile = accepts if cfg.profile is None else cfg.profile.narrowed_to(
            accepts, "AOTInductor package", "recompile the package for this profile (slimexport build --backend aoti)")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)  # process-wide: the package's OpenMP kernels use it
        self.runner = torch._inductor.aoti_load_package(str(package), device_index=dev.index if dev.type == "cuda" else -1)

    def _to_device(self, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """The inputs in the package's order (sample, timestep, encoder_hidden_states[, cache])."""
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[e["name"]])).to(self.device) for e in self.io_spec["inputs"])

    def _call(self, args) -> list[torch.Tensor]:
        with torch.inference_mode(), exact_fp32(self.exact):  # fp32 packages on a GPU: no TF32 in cuDNN/cuBLAS calls
            out = self.runner(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._call(self._to_device(feeds))
        return {e["name"]: t.detach().to("cpu").contiguous().numpy().copy() for e, t in zip(self.io_spec["outputs"], outs)}

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """Inputs are copied to the device once; the returned call leaves its output on the device."""
        args = self._to_device(self.check(feeds))  # a [1] timestep repeated to the batch
        if len(self.io_spec["outputs"]) == 1:
            return lambda: self._call(args)[0]  # the latent itself, as the other engines' prepared calls return
        return lambda: self._call(args)

    def info(self) -> dict:
        s = self.sidecar
        return {
            "backend": self.name, "device": self.device, "device_name": self.here.device_name,
            "threads": torch.get_num_threads(), "dtype": s["dtype"], "package": self.package.name,
            "package_sha256": s["package_sha256"], "source_sha256": s["source_sha256"], "dynamic": s["dynamic"],
            "accepts": s["accepts"], "dynamic_fallback": s.get("dynamic_fallback"), "reused": self.reused,
            "compile_seconds": s.get("compile_seconds"), "export_seconds": s.get("export_seconds"),
            **({"compute_capability": self.here.compute_capability} if self.here.device_type == "cuda" else {}),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        }

    def close(self) -> None:
        self.runner = None


def default_profile(unet: nn.Module) -> EngineProfile:
    """Shapes for a package when the config gives none: batch 1..8, heights and widths from one downsampling
    step to twice the model's ``sample_size``, optimal at ``sample_size``."""
    m = arch.latent_multiple(unet)
    size = int(unet.config.sample_size) if isinstance(unet.config.sample_size, int) else int(unet.config.sample_size[0])
    size = max(m, size // m * m)
    return EngineProfile(1, 2, 8, m, size, 2 * size, m, size, 2 * size, latent_multiple=m)


def create(source, cfg: EngineConfig) -> AotiEngine:
    """Registry factory.

    ``source`` is a ``UNet2DConditionModel`` (compiled into ``cfg.cache_dir``, or reused from there when the same
    model, dtype, profile, slimexport code, device and torch version were compiled before), a slim UNet folder, or a ``.pt2``
    package (loaded after the compatibility check).
    """
    if isinstance(source, (str, Path)) and str(source).endswith(PACKAGE_SUFFIX):
        return AotiEngine(source, cfg)
    source = unet_from_source(source, "aoti", "a UNet module, a slim UNet folder or a .pt2 package")
    profile = cfg.profile or default_profile(source)
    res = build_aoti_package(source, cfg.cache_dir, profile, dtype=cfg.dtype, device=cfg.device, seq_len=cfg.seq_len)
    return AotiEngine(res.package, cfg, reused=res.reused)
