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

BINNED = ("x", "y", "z", "r", "pi", "po")


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
        sized = [(b.path, {"x": b.width, "y": b.width, "z": b.ffn_width, "e": b.context_dim}) for b in blocks]
        sized += [(r.path, {"r": r.inner}) for r in self.resnets]
        sized += [(t.path, {"pi": t.channels, "po": t.inner}) for t in self.projs]
        for path, sizes in sized:
            for k, n in sizes.items():
                key = f"{path}.{k}"
                if k in BINNED:
                    home = "cpu" if self.offload else self.device
                    self.corr[key] = torch.zeros(num_bins, n, n, device=home, **f32)
                    if self.offload:
                        self._live[key] = torch.zeros(n, n, device=self.device, **f32)
                    self.counts[key] = torch.zeros(num_bins, dtype=torch.float64)
                else:
                    self.corr[key] = torch.zeros(n, n, device=self.device, **f32)
                    self.counts[key] = torch.zeros(1, dtype=torch.float64)
        # Per-step scalars, accumulated on the device (no host sync inside hooks).
        scalar_keys = []
        for b in blocks:
            scalar_keys += [f"{b.path}.{s}" for s in ("attn1.qk", "attn1.vo", "attn2.qk", "attn2.vo", "ff")]
            scalar_keys += [f"{b.path}.{s}" for s in ("x", "y", "e", "z")]
            scalar_keys += [f"{b.path}.out.{s}" for s in ("attn1", "attn2", "ff", "block_in")]
        for r in self.resnets:
            scalar_keys += [f"{r.path}.resnet", f"{r.path}.r", f"{r.path}.out.block_in"]
        for t in self.projs:
            scalar_keys += [f"{t.path}.{k}" for k in ("proj_in", "proj_out", "pi", "po", "out.block_in")]
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

    def _hooks_for(self, b: BlockInfo, block) -> list:
        p = b.path
        a1, a2, ff = block.attn1, block.attn2, block.ff
        reg = []

        def on_q1(mod, args, out):
            self._acc(f"{p}.x", args[0])
            self._energy(f"{p}.attn1.qk", out)

        def on_v1(mod, args, out):
            self._energy(f"{p}.attn1.vo", out)

        def on_q2(mod, args, out):
            self._acc(f"{p}.y", args[0])
            self._energy(f"{p}.attn2.qk", out)

        def on_v2(mod, args, out):
            self._acc(f"{p}.e", args[0])
            self._energy(f"{p}.attn2.vo", out)

        def on_down(mod, args, out):
            self._acc(f"{p}.z", args[0])
            self._energy(f"{p}.ff", out, mod.bias)

        def on_out(name):
            def hook(mod, args, out):
                self._energy(f"{p}.out.{name}", out[0] if isinstance(out, tuple) else out)

            return hook

        def on_block_in(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            self._energy(f"{p}.out.block_in", hs)

        reg.append(a1.to_q.register_forward_hook(on_q1))
        reg.append(a1.to_v.register_forward_hook(on_v1))
        reg.append(a2.to_q.register_forward_hook(on_q2))
        reg.append(a2.to_v.register_forward_hook(on_v2))
        reg.append(ff.net[2].register_forward_hook(on_down))
        reg.append(a1.register_forward_hook(on_out("attn1")))
        reg.append(a2.register_forward_hook(on_out("attn2")))
        reg.append(ff.register_forward_hook(on_out("ff")))
        reg.append(block.register_forward_pre_hook(on_block_in, with_kwargs=True))
        return reg

    def _resnet_hooks(self, r: ResnetInfo, block) -> list:
        p = r.path

        def on_conv2(mod, args, out):
            h = args[0]
            self._acc(f"{p}.r", h.movedim(1, -1))  # channels last: every pixel is a token
            self._energy(f"{p}.resnet", out, None if mod.bias is None else mod.bias[:, None, None])

        def on_block_in(mod, args, kwargs):
            self._energy(f"{p}.out.block_in", args[0] if args else kwargs["input_tensor"])

        return [block.conv2.register_forward_hook(on_conv2), block.register_forward_pre_hook(on_block_in, with_kwargs=True)]

    def _proj_hooks(self, t: ProjInfo, mod) -> list:
        p = t.path

        def hook(key: str, kind: str):
            def on_proj(m, args, out):
                x = args[0]
                if t.conv:  # NCHW: every pixel is a token
                    x = x.movedim(1, -1)
                    bias = None if m.bias is None else m.bias[:, None, None]
                else:
                    bias = m.bias
                self._acc(f"{p}.{key}", x)
                self._energy(f"{p}.{kind}", out, bias)

            return on_proj

        def on_block_in(m, args, kwargs):
            self._energy(f"{p}.out.block_in", args[0] if args else kwargs["hidden_states"])

        return [mod.proj_in.register_forward_hook(hook("pi", "proj_in")),
                mod.proj_out.register_forward_hook(hook("po", "proj_out")),
                mod.register_forward_pre_hook(on_block_in, with_kwargs=True)]

    def __enter__(self):
        try:
            for b in self.blocks:
                self._handles += self._hooks_for(b, self.unet.get_submodule(b.path))
            for r in self.resnets:
                self._handles += self._resnet_hooks(r, self.unet.get_submodule(r.path))
            for t in self.projs:
                self._handles += self._proj_hooks(t, self.unet.get_submodule(t.path))
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
    return f"{path}.~{last}" if last in ("po", "proj_out") else key


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


STAT_NAMES = {"x": "attn1 input", "y": "attn2 query input", "e": "text tokens", "z": "GEGLU output", "r": "ResNet inner channels",
              "pi": "proj_in input", "po": "proj_out input"}
