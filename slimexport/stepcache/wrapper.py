"""``CachedUNet``: a drop-in ``pipe.unet`` that follows a step-cache plan inside diffusers' pipelines.

    pipe = StableDiffusionPipeline(...)                 # or bundle.pipeline()
    pipe.unet = CachedUNet(pipe.unet, plan)             # plan: CachePlan (any step count) or Schedule
    image = pipe(prompt, num_inference_steps=50).images[0]

Each UNet call is a step of the current generation; a call whose timestep is not below the previous one's (or whose
input shape changed) starts a new generation, so consecutive ``pipe(...)`` calls need nothing in between;
:meth:`CachedUNet.reset` forces it. Classifier-free guidance batches (``[uncond; cond]``) are one call: the cache
holds every row. Only what SD1.x/SD2.x text-to-image pipelines pass is accepted (no ControlNet, adapters, masks,
LoRA scales or added conditioning): anything else is refused with a one-line error rather than silently ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimexport.errors import UsageError
from slimexport.stepcache.schedule import CachePlan, Schedule, ScheduleCursor
from slimexport.stepcache.unet import SplitUNet


def timestep_value(timestep) -> float:
    """The (first) timestep of a UNet call as a Python float (a scalar, ``[1]`` or ``[B]`` tensor, or a number)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class CachedUNet(nn.Module):
    """A UNet that runs the full path or the shallow path at each call, as ``plan`` decides.

    Args:
        unet: the dense or slim ``UNet2DConditionModel`` (shared, not copied).
        plan: a :class:`CachePlan` (decides by timestep: any number of steps) or a fixed :class:`Schedule`.

    Attributes:
        history: ``F``/``s`` per call of the current generation (``cursor.history``).
    """

    def __init__(self, unet: nn.Module, plan: CachePlan | Schedule):
        super().__init__()
        self.cursor = ScheduleCursor(plan)
        self.split = SplitUNet(unet, plan.depth)
        self._cache: torch.Tensor | None = None

    @property
    def unet(self) -> nn.Module:
        return self.split.unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def history(self) -> str:
        return self.cursor.history

    def reset(self) -> None:
        """Start a new generation at the next call (full UNet) and drop the cached feature."""
        self.cursor.reset()
        self._cache = None

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, class_labels=None,
                timestep_cond=None, attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        """``UNet2DConditionModel.forward``'s signature; returns ``UNet2DConditionOutput`` or ``(sample,)``."""
        extras = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                  "cross_attention_kwargs": cross_attention_kwargs or None, "added_cond_kwargs": added_cond_kwargs or None,
                  "down_block_additional_residuals": down_block_additional_residuals,
                  "mid_block_additional_residual": mid_block_additional_residual,
                  "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                  "encoder_attention_mask": encoder_attention_mask}
        given = [k for k, v in extras.items() if v is not None]
        if given:
            raise UsageError(f"CachedUNet does not take {', '.join(given)}",
                             "use it in plain SD1.x/SD2.x text-to-image pipelines, or the UNet itself for ControlNet, "
                             "adapters, masks and LoRA scales")
        key = (tuple(sample.shape), sample.dtype, sample.device)
        if self.cursor.next(timestep_value(timestep), key):
            eps, self._cache = self.split.full(sample, timestep, encoder_hidden_states)
        else:
            eps = self.split.shallow(sample, timestep, encoder_hidden_states, self._cache)
        if not return_dict:
            return (eps,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=eps)
