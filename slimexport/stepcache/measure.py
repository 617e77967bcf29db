"""How fast the UNet's deep features change between denoising steps: the evidence a caching schedule is chosen from.

:func:`measure_change` runs the model's own sampler (:func:`slimexport.calibrate.runner.denoise`: the bundle's
DDIM scheduler, both CFG branches in one batch, per-prompt seeds) over calibration prompts with hooks on the UNet
(:class:`ChangeCollector`) and records, at every step ``i ≥ 1`` and every cache depth ``d``:

- ``change[d][i] = ‖h_d(i) − h_d(i−1)‖ / ‖h_d(i−1)‖``: the relative change of the feature a depth-``d`` cache holds
  (the input of ``up_blocks[n − d]``, see :mod:`slimexport.stepcache.unet`) between consecutive steps;
- ``eps_error[d][i] = ‖ε_shallow − ε‖ / ‖ε‖``: the error of the shallow path at step ``i`` run from step ``i − 1``'s
  cache, against the full UNet at step ``i`` (what reusing the cache for one step costs in the output);

each a Frobenius ratio over every prompt and both CFG rows (sums of squares over batches, then the ratio). Step 0
has no predecessor (``None``). The result, :class:`ChangeProfile`, is a small JSON artifact with the sampler's
timesteps, so a schedule for another step count can be mapped onto it by timestep
(:meth:`ChangeProfile.predicted`).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimexport.artifacts import read_json, write_json
from slimexport.calibrate.runner import denoise, initial_latents
from slimexport.config import CalibConfig
from slimexport.errors import ArtifactError, UsageError
from slimexport.models.bundle import converted_copy
from slimexport.stepcache.unet import SplitUNet, check_depth, num_levels

log = logging.getLogger(__name__)

PROFILE_FORMAT = "slimexport.stepcache.change/1"
PROFILE_FILE = "change.json"


@dataclass(frozen=True)
class ChangeProfile:
    """Per-step, per-depth feature change of one UNet along its sampler's trajectory.

    Attributes:
        timesteps: the sampler's timesteps, in the order it runs them (descending).
        depths: cache depths measured (1..number of down blocks).
        change: ``change[k][i]``: relative change of depth ``depths[k]``'s feature from step ``i − 1`` to ``i``
            (``None`` at ``i = 0``).
        eps_error: ``eps_error[k][i]``: relative ε error of the depth-``depths[k]`` shallow path run from step
            ``i − 1``'s cache (``None`` at ``i = 0``, or everywhere when it was not measured).
        meta: how it was measured (model, prompts, steps, guidance, seconds, ...).
    """

    timesteps: tuple[int, ...]
    depths: tuple[int, ...]
    change: tuple[tuple[float | None, ...], ...]
    eps_error: tuple[tuple[float | None, ...], ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.timesteps)
        if n < 2 or any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ArtifactError(f"a change profile needs >= 2 strictly decreasing timesteps, got {list(self.timesteps)}",
                                "measure again with at least 2 sampler steps")
        for name in ("change", "eps_error"):
            rows = getattr(self, name)
            if len(rows) != len(self.depths) or any(len(r) != n for r in rows):
                raise ArtifactError(f"change profile field {name} is not [depth][step] = [{len(self.depths)}][{n}]",
                                    "measure again (slimexport.stepcache.measure.measure_change)")

    def row(self, depth: int, what: str = "change") -> tuple[float | None, ...]:
        if depth not in self.depths:
            raise UsageError(f"cache depth {depth} was not measured (measured: {list(self.depths)})",
                             f"pass a depth in {list(self.depths)} or measure it")
        return getattr(self, what)[self.depths.index(depth)]

    def rates(self, depth: int) -> list[float]:
        """Change per unit of timestep on each calibration interval ``[t_i, t_{i−1}]``, ``i = 1..S−1``."""
        c, t = self.row(depth), self.timesteps
        return [float(c[i]) / (t[i - 1] - t[i]) for i in range(1, len(t))]

    def predicted(self, depth: int, t_from: float, t_to: float) -> float:
        """Predicted accumulated relative change of depth ``depth``'s feature between timesteps ``t_from`` and
        ``t_to`` (either order): the integral of the measured change rate, piecewise constant on the calibration
        intervals, held constant beyond the first and last (a step count other than the calibration's maps by
        timestep)."""
        lo, hi = sorted((float(t_from), float(t_to)))
        rates = self.rates(depth)
        # ascending interval edges: asc[j] .. asc[j+1] has rate rates[S-2-j]
        asc = list(reversed(self.timesteps))
        r_asc = list(reversed(rates))
        total = 0.0
        if lo < asc[0]:
            total += (min(hi, asc[0]) - lo) * r_asc[0]
        if hi > asc[-1]:
            total += (hi - max(lo, asc[-1])) * r_asc[-1]
        j = max(0, bisect.bisect_right(asc, lo) - 1)
        while j < len(r_asc) and asc[j] < hi:
            a, b = max(asc[j], lo), min(asc[j + 1], hi)
            if b > a:
                total += (b - a) * r_asc[j]
            j += 1
        return total

    def summary(self) -> dict:
        """Mean change and ε error per depth over the measured steps (for reports)."""
        out = {}
        for d in self.depths:
            c = [v for v in self.row(d) if v is not None]
            e = [v for v in self.row(d, "eps_error") if v is not None]
            out[str(d)] = {"mean_change": sum(c) / len(c), "max_change": max(c),
                           "mean_eps_error": sum(e) / len(e) if e else None}
        return out

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "timesteps": list(self.timesteps), "depths": list(self.depths),
                "change": [list(r) for r in self.change], "eps_error": [list(r) for r in self.eps_error],
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> ChangeProfile:
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ArtifactError(f"not a step-change profile (format {PROFILE_FORMAT} expected)",
                                "measure again (slimexport.stepcache.measure.measure_change)")
        return cls(timesteps=tuple(int(t) for t in d["timesteps"]), depths=tuple(int(x) for x in d["depths"]),
                   change=tuple(tuple(r) for r in d["change"]), eps_error=tuple(tuple(r) for r in d["eps_error"]),
                   meta=dict(d.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ChangeProfile:
        return cls.from_dict(read_json(path, "step-change profile"))


class ChangeCollector:
    """Hooks that measure feature change and one-step cache error; owns its handles (``with`` block).

    Registers a forward pre-hook on every up block (its input is the cache of one depth), a pre-hook on the UNet
    (the step's inputs) and a forward hook on the UNet (its ε, then the shallow probes). Keeps only the previous
    step's features and sums of squares (float64); never sets attributes on modules.

    Args:
        unet: the UNet the sampler calls.
        num_steps: steps per trajectory.
        depths: cache depths to measure (default all).
        eps_error: also run the shallow path from the previous step's cache at every step (one shallow pass per
            depth per step): ``True`` for every depth, or the depths to run it for.
    """

    def __init__(self, unet, num_steps: int, depths: tuple[int, ...] | None = None, eps_error: bool | tuple[int, ...] = True):
        self.unet = unet
        self.n = num_levels(unet)
        self.depths = tuple(check_depth(unet, d) for d in (depths or range(1, self.n + 1)))
        self.num_steps = num_steps
        self.eps_depths = self.depths if eps_error is True else tuple(check_depth(unet, d) for d in (eps_error or ()))
        self.split = SplitUNet(unet, self.depths[0])
        zeros = [[0.0] * num_steps for _ in self.depths]
        self.sums = {k: [list(r) for r in zeros] for k in ("dh", "h", "de", "e")}
        self.step = 0
        self._cur: dict[int, torch.Tensor] = {}
        self._prev: dict[int, torch.Tensor] = {}
        self._inputs = None
        self._probing = False
        self._handles: list = []

    def set_step(self, step: int) -> None:
        """The step the next UNet call belongs to; step 0 starts a new trajectory."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside [0, {self.num_steps})")
        if step == 0:
            self._prev = {}
        self.step = step

    def _up_hook(self, depth: int):
        def hook(_mod, args, kwargs):
            if not self._probing and depth in self.depths:
                h = kwargs.get("hidden_states", args[0] if args else None)
                self._cur[depth] = h.detach()
        return hook

    def _in_hook(self, _mod, args, kwargs):
        names = ("sample", "timestep", "encoder_hidden_states")
        vals = list(args[:3]) + [kwargs.get(k) for k in names[len(args[:3]):]]
        self._inputs = tuple(vals)

    def _out_hook(self, _mod, _args, _kwargs, out):
        eps = (out[0] if isinstance(out, tuple) else out.sample).detach()
        i = self.step
        for k, d in enumerate(self.depths):
            cur, prev = self._cur.get(d), self._prev.get(d)
            if prev is None or cur is None or prev.shape != cur.shape:
                continue
            self.sums["dh"][k][i] += float((cur.double() - prev.double()).square().sum())
            self.sums["h"][k][i] += float(prev.double().square().sum())
            if d in self.eps_depths:
                x, t, ctx = self._inputs
                self._probing = True
                try:
                    with torch.no_grad():
                        e = self.split.shallow(x, t, ctx, prev, depth=d)
                finally:
                    self._probing = False
                self.sums["de"][k][i] += float((e.double() - eps.double()).square().sum())
                self.sums["e"][k][i] += float(eps.double().square().sum())
        self._prev, self._cur = dict(self._cur), {}

    def __enter__(self):
        try:
            for k, block in enumerate(self.unet.up_blocks):
                self._handles.append(block.register_forward_pre_hook(self._up_hook(self.n - k), with_kwargs=True))
            self._handles.append(self.unet.register_forward_pre_hook(self._in_hook, with_kwargs=True))
            self._handles.append(self.unet.register_forward_hook(self._out_hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._prev, self._cur, self._inputs = {}, {}, None
        return False

    def ratios(self, num: str, den: str) -> tuple[tuple[float | None, ...], ...]:
        def ratio(a, b):  # b == 0: nothing measured (step 0, or a depth without ε probes)
            return math.sqrt(a / b) if b > 0 else None
        return tuple(tuple(None if i == 0 else ratio(a, b) for i, (a, b) in enumerate(zip(rn, rd)))
                     for rn, rd in zip(self.sums[num], self.sums[den]))


def measure_change(bundle, prompts: list[str], cfg: CalibConfig, *, unet=None, depths: tuple[int, ...] | None = None,
                   eps_error: bool | tuple[int, ...] = True, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   progress: bool = False) -> ChangeProfile:
    """Run the calibration sampler over ``prompts`` and measure per-step, per-depth feature change.

    Args:
        bundle: the model (its scheduler, prompt encoder and latent size; its UNet unless ``unet`` is given).
        prompts: calibration prompts (the SlimSet, or its first few: the change is an average over them).
        cfg: the calibration sampler's settings (steps, guidance, batch, size, seed): the same as the SlimDiff
            calibration's, so the timesteps match.
        unet: the UNet to measure (dense or slim); default ``bundle.unet``. Run as a copy on ``device`` in ``dtype``.
        depths: cache depths (default all).
        eps_error: also measure the one-step cache error of the output: ``True`` at every depth, or at these depths.

    Returns:
        :class:`ChangeProfile` with the sampler's timesteps.
    """
    if not prompts:
        raise UsageError("no prompts to measure step changes on", "pass at least one calibration prompt")
    if cfg.num_steps < 2:
        raise UsageError(f"measuring step changes needs >= 2 sampler steps, got {cfg.num_steps}", "use more --calib-steps")
    device = torch.device(device)
    model = converted_copy((unet if unet is not None else bundle.unet).eval(), device, dtype)
    h, w = bundle.latent_size(cfg.height, cfg.width)
    shape = (int(model.config.in_channels), h, w)
    encoder = bundle.encoder.on_device(device)
    uncond_one = encoder.encode([""])[0].to(device=device, dtype=dtype) if cfg.use_cfg else None
    t0 = time.perf_counter()
    collector = ChangeCollector(model, cfg.num_steps, depths, eps_error)
    batches = [list(range(s, min(s + cfg.batch_size, len(prompts)))) for s in range(0, len(prompts), cfg.batch_size)]
    with collector, torch.no_grad():
        for idx in batches:
            cond = encoder.encode([prompts[i] for i in idx])[0].to(device=device, dtype=dtype)
            uncond = uncond_one.expand(len(idx), -1, -1) if uncond_one is not None else None
            scheduler = bundle.make_scheduler()
            latents = initial_latents([cfg.seed + i for i in idx], shape, device, dtype, scheduler.init_noise_sigma)
            denoise(model, scheduler, cond, uncond, latents, cfg.num_steps, cfg.guidance_scale, on_step=collector.set_step)
            if progress:
                log.info("step change: %d/%d prompts", idx[-1] + 1, len(prompts))
    scheduler = bundle.make_scheduler()
    scheduler.set_timesteps(cfg.num_steps)
    meta = {"model": bundle.name, "prompts": len(prompts), "num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale,
            "height": h, "width": w, "seed": cfg.seed, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "seconds": round(time.perf_counter() - t0, 3), "eps_error_depths": list(collector.eps_depths)}
    return ChangeProfile(timesteps=tuple(int(t) for t in scheduler.timesteps), depths=collector.depths,
                         change=collector.ratios("dh", "h"), eps_error=collector.ratios("de", "e"), meta=meta)
