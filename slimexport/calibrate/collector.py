"""Streaming activation statistics: forward hooks that accumulate per-timestep-bin correlations in fp32.

The collector owns its hooks: it registers them in ``__enter__`` and removes exactly those handles in
``__exit__``. It never stores raw activations and never sets attributes on modules. Per block it keeps

- ``x``: ``Σ xᵀx`` of ``attn1.to_q``'s input (norm1 output), per bin          → attn1 QK and VO
- ``y``: ``Σ yᵀy`` of ``attn2.to_q``'s input (norm2 output), per bin          → attn2 QK, query side
- ``e``: ``Σ eᵀe`` of ``attn2.to_v``'s input (text tokens), all steps together → attn2 keys and VO
- ``z``: ``Σ zᵀz`` of ``ff.net.2``'s input (GEGLU output), per bin             → FFN Nyström

per ``ResnetBlock2D`` ``r``: the channel correlation of ``conv2``'s input (post-activation inner
channels, every pixel a token), per bin → group-pivoted Nyström of the inner width; per ``Transformer2DModel``
``pi``/``po``: the correlations of ``proj_in``'s and ``proj_out``'s inputs, per bin → whitened SVD;

plus token counts, and per step the two scalars of each module's spectral influence score:
``‖x A_m‖²_F`` (read off the layer's own output, so it costs nothing) and ``‖x‖²_F``; and, for the optional
propagation factor, each sub-layer's output energy against its block's input energy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimexport.distributed import dist_backend
from slimexport.errors import NumericalError
from slimexport.models.arch import BlockInfo, ProjInfo, ResnetInfo
from slimexport.models.kinds import PO, STAT_NAMES, UNITS, Tap, Unit, stat_keys

# Statistics collected per timestep bin (the rest, the text tokens, over all steps together).
BINNED = tuple(sorted(set().union(*(u.binned for u in UNITS.values()))))


def addmm_accumulate(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += xᵀx`` in fp32 by ``addmm_`` (the plain reference)."""
    xf = x.float()
    acc.addmm_(xf.T, xf)


def kernel_accumulate(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += xᵀx`` through the kernel dispatch: the Triton kernel on CUDA where it is faster for the shape
    (measured once per shape), the torch reference on the CPU."""
    from slimexport.kernels import cov_accumulate

    cov_accumulate(acc, x)


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``‖x‖²`` accumulated in fp32 in one pass (no fp32 copy of an fp16 activation), as fp64."""
    return torch.linalg.vector_norm(x, dtype=torch.float32).double().square()


def step_to_bin(step: int, num_steps: int, num_bins: int) -> int:
    """Bin of a denoising step: ``num_bins`` groups of consecutive steps, as equal as possible."""
    return step * num_bins // num_steps


class StatsCollector:
    """Context manager collecting the statistics of :mod:`slimexport.calibrate` on a UNet.

    Args:
        unet: the model the hooks go on.
        blocks: the transformer blocks (``slimexport.models.arch.blocks(unet)``).
        num_steps: denoising steps per trajectory; ``num_bins``: bins they are grouped in.
        device: where the accumulators live (the UNet's device).
        offload: keep only the current bin on ``device`` and add finished bins into CPU memory.
        accumulate: ``(acc, x) -> None`` doing ``acc += xᵀx`` (reference or kernel).
        resnets: the ResNet blocks whose inner-channel statistics are collected too.
        projs: the transformers whose ``proj_in``/``proj_out`` input statistics are collected too.
    """

    def __init__(self, unet, blocks: list[BlockInfo], num_steps: int, num_bins: int, device, offload: bool = False,
                 accumulate: Callable[[torch.Tensor, torch.Tensor], None] = addmm_accumulate,
                 resnets: list[ResnetInfo] | None = None, projs: list[ProjInfo] | None = None):
        self.unet = unet
        self.blocks = blocks
        self.resnets = list(resnets or [])
        self.projs = list(projs or [])
        self.num_steps = num_steps
        self.num_bins = num_bins
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"
        self.accumulate = accumulate
        self.step = 0
        self._handles: list = []
        f32 = dict(dtype=torch.float32)
        self.corr: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] = {}
        self.units: list[tuple[Unit, list]] = [(UNITS["block"], list(blocks)), (UNITS["resnet"], self.resnets),
                                               (UNITS["proj"], self.projs)]
        for unit, infos in self.units:
            for info in infos:
                for k, width in unit.stats.items():
                    key, n = f"{info.path}.{k}", width(info)
                    if k in unit.binned:
                        home = "cpu" if self.offload else self.device
                        self.corr[key] = torch.zeros(num_bins, n, n, device=home, **f32)
                        if self.offload:
                            self._live[key] = torch.zeros(n, n, device=self.device, **f32)
                        self.counts[key] = torch.zeros(num_bins, dtype=torch.float64)
                    else:
                        self.corr[key] = torch.zeros(n, n, device=self.device, **f32)
                        self.counts[key] = torch.zeros(1, dtype=torch.float64)
        # Per-step scalars, accumulated on the device (no host sync inside hooks).
        scalar_keys = [f"{info.path}.{k}" for unit, infos in self.units for info in infos for k in stat_keys(unit)]
        self.scalars = {k: torch.zeros(num_steps, device=self.device, dtype=torch.float64) for k in scalar_keys}
        # token counts are shapes, known on the host: counting there launches nothing on the device
        self._counts_host = {k: [0] * (num_bins if k.rsplit(".", 1)[1] in BINNED else 1) for k in self.counts}

    # -- hook plumbing ---------------------------------------------------------------------------------
    @property
    def bin(self) -> int:
        return step_to_bin(self.step, self.num_steps, self.num_bins)

    def set_step(self, step: int) -> None:
        """Tell the collector which denoising step the next UNet call belongs to."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside [0, {self.num_steps})")
        if self.offload and step_to_bin(step, self.num_steps, self.num_bins) != self.bin:
            self._flush()
        self.step = step

    def _flush(self) -> None:
        b = self.bin
        for key, live in self._live.items():
            self.corr[key][b] += live.to("cpu", non_blocking=False)
            live.zero_()

    def _acc(self, key: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        kind = key.rsplit(".", 1)[1]
        if kind in BINNED:
            target = self._live[key] if self.offload else self.corr[key][self.bin]
            self._counts_host[key][self.bin] += x2.shape[0]
        else:
            target = self.corr[key]
            self._counts_host[key][0] += x2.shape[0]
        self.accumulate(target, x2)
        self.scalars[key][self.step].add_(_sq_norm(x2))  # in place on the view: no setitem copy

    def _energy(self, key: str, y: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if bias is not None:
            y = y - bias.to(y.dtype)
        self.scalars[key][self.step].add_(_sq_norm(y))  # in place on the view: no setitem copy

    def _tap(self, path: str, tap: Tap, mod) -> object:
        """Register one table hook (``slimexport.models.kinds``) of the unit at ``path``; returns its handle."""
        if tap.on_input:
            def on_input(m, args, kwargs):
                self._energy(f"{path}.{tap.energy}", args[0] if args else kwargs[tap.kwarg])

            return mod.register_forward_pre_hook(on_input, with_kwargs=True)

        def on_output(m, args, out):
            if tap.stat is not None:
                x = args[0]
                self._acc(f"{path}.{tap.stat}", x.movedim(1, -1) if x.dim() == 4 else x)  # NCHW: every pixel a token
            if tap.energy is not None:
                y = out[0] if isinstance(out, tuple) else out
                bias = getattr(m, "bias", None) if tap.subtract_bias else None
                if bias is not None and y.dim() == 4:
                    bias = bias[:, None, None]
                self._energy(f"{path}.{tap.energy}", y, bias)

        return mod.register_forward_hook(on_output)

    def __enter__(self):
        try:
            for unit, infos in self.units:
                for info in infos:
                    mod = self.unet.get_submodule(info.path)
                    self._handles += [self._tap(info.path, t, mod.get_submodule(t.module)) for t in unit.taps]
        except BaseException:
            self.__exit__()  # no hook stays on the UNet when registering fails halfway
            raise
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.offload:
            self._flush()
        return False

    # -- results ---------------------------------------------------------------------------------------
    def finalize(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """All-reduce across ranks (if distributed), check for NaN/Inf, return CPU tensors.

        Returns:
            ``(corr, counts, scalars)``; correlations are sums (not means), counts are token counts.
        """
        for k, v in self._counts_host.items():
            self.counts[k] = torch.tensor(v, dtype=torch.float64)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for d in (self.corr, self.counts, self.scalars):
                for k in sorted(d):
                    t = d[k]
                    dev = self.device if dist_backend() == "nccl" else torch.device("cpu")
                    buf = t.to(dev)
                    dist.all_reduce(buf)
                    d[k] = buf.to(t.device)
        check_stats(self.corr, self.scalars, self.num_steps, self.num_bins)  # where the tensors are: on the GPU, fast
        corr = {k: v.detach().cpu() for k, v in self.corr.items()}
        scalars = {k: v.detach().cpu() for k, v in self.scalars.items()}
        return corr, dict(self.counts), scalars


def _flow_order(key: str) -> str:
    """Sort key placing a transformer's ``proj_out`` statistics after its blocks (``po`` would sort before
    ``transformer_blocks``), so that at one step the first bad key is the one nearest the model's input."""
    path, _, last = key.rpartition(".")
    return f"{path}.~{last}" if last in (PO, "proj_out") else key


def check_stats(corr: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor], num_steps: int, num_bins: int) -> None:
    """Raise :class:`NumericalError` naming the module and timestep bin of the first NaN/Inf.

    The per-step activation sums are checked first, earliest step first: a NaN spreads to every module downstream and,
    through the latents, to every later step, so the earliest step names the module where it started (at one step,
    keys sort in the UNet's down → mid → up order)."""
    first = None
    for key in sorted(scalars, key=_flow_order):
        bad = ~torch.isfinite(scalars[key].reshape(-1))
        if bool(bad.any()):
            step = int(bad.nonzero()[0, 0])
            if first is None or step < first[0]:
                first = (step, key)
    if first is not None:
        step, key = first
        raise NumericalError(
            f"NaN/Inf in the activations of {key} at step {step} (timestep bin {step_to_bin(step, num_steps, num_bins)})",
            "the model overflows in this dtype: rerun with --calib-dtype fp32, or check the model weights",
        )
    for key in sorted(corr):
        t = corr[key]
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.dim() == 3 else t.reshape(1, -1)).all(-1)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            where = f"timestep bin {b}" if t.dim() == 3 else "the text-token statistics"
            raise NumericalError(
                f"NaN/Inf in the calibration statistics of {key.rsplit('.', 1)[0]} ({STAT_NAMES[key.rsplit('.', 1)[1]]}) at {where}",
                "the model overflows in this dtype: rerun with --calib-dtype fp32, or check the model weights",
            )
