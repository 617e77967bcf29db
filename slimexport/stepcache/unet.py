"""A diffusers ``UNet2DConditionModel`` split into a full path that also returns a deep feature and a shallow path
that reuses it (DeepCache, Ma et al., CVPR 2024, at the granularity of whole blocks).

The UNet's skip connections pair down block ``i`` with up block ``n - 1 - i`` (``n`` blocks each way): the last
``d`` up blocks consume exactly the skip tensors of ``conv_in`` and of the first ``d`` down blocks. So at *depth*
``d`` the shallow path is ``conv_in``, the time embedding, ``down_blocks[:d]``, then ``up_blocks[n-d:]`` and
``conv_out``, started from the *cache*: the hidden state that entered ``up_blocks[n-d]`` at the last full step (the
output of ``up_blocks[n-d-1]``, or of the mid block at ``d = n``). Everything deeper (the other down blocks, the mid
block, the first up blocks) is skipped. With the cache of the same step the shallow path reproduces the UNet.

The full path is ``UNet2DConditionModel.forward`` for SD1.x/SD2.x text-to-image UNets (what
:func:`slimexport.models.registry.check_supported_unet` admits: no class or added embeddings, no masks, no
ControlNet residuals), reading the hidden state at the cut on the way. Slim UNets (``load_slim_unet``) keep the same
module tree and run unchanged. The last shallow down block still computes its downsampler (its output is not used;
the ONNX export drops it as dead code).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimexport.errors import UsageError


def num_levels(unet) -> int:
    """Down blocks of ``unet`` (= up blocks for the UNets slimexport supports): the deepest cache depth."""
    return len(unet.down_blocks)


def check_depth(unet, depth) -> int:
    """``depth`` if it is a cache depth of ``unet`` (1..number of down blocks).

    Raises:
        UsageError: one line naming the valid range.
    """
    n = num_levels(unet)
    if len(unet.up_blocks) != n:
        raise UsageError(f"the UNet has {n} down blocks but {len(unet.up_blocks)} up blocks: its skip connections do not "
                         "pair block by block", "step caching supports SD1.x/SD2.x-shaped UNets only")
    if not (isinstance(depth, int) and not isinstance(depth, bool)) or not 1 <= depth <= n:
        raise UsageError(f"cache depth {depth!r} is outside 1..{n} for this UNet ({n} down blocks)",
                         f"pass a depth in 1..{n} (1: shallowest path, fastest; {n}: skips only the mid block)")
    return depth


def cache_channels(unet, depth: int) -> int:
    """Channels of the cached feature at ``depth`` (the input width of ``up_blocks[n - depth]``)."""
    check_depth(unet, depth)
    blocks = list(unet.config.block_out_channels)
    return int(blocks[min(depth, len(blocks) - 1)])


def cache_scale(unet, depth: int) -> int:
    """The cached feature's downsampling factor against the latent: its height is ``H / cache_scale`` (rounded up)."""
    n = num_levels(unet)
    check_depth(unet, depth)
    # up_blocks[k] upsamples at its end unless it is the last; up_blocks[n - depth] starts at the resolution its
    # predecessors reached: n - 1 - (number of upsamplers among up_blocks[:n - depth]) halvings below the latent.
    ups = sum(1 for b in unet.up_blocks[: n - depth] if getattr(b, "upsamplers", None) is not None)
    downs = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None) is not None)
    return 2 ** (downs - ups)


class SplitUNet(nn.Module):
    """A UNet (shared, not copied) as a full and a shallow path at a cache ``depth``.

    Args:
        unet: a dense or slim ``UNet2DConditionModel`` (SD1.x/SD2.x text-to-image).
        depth: 1..``len(unet.down_blocks)``.

    Shapes: ``sample [B, C, H, W]``, ``timestep`` a scalar, ``[1]`` or ``[B]``, ``encoder_hidden_states [B, L, D]``,
    ``cache [B, cache_channels, ⌈H / cache_scale⌉, ⌈W / cache_scale⌉]``; every tensor in the UNet's dtype except the
    timestep (any float or integer dtype, as diffusers takes it).
    """

    def __init__(self, unet: nn.Module, depth: int):
        super().__init__()
        self.depth = check_depth(unet, depth)
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    def _embed(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        return u.time_embed_act(emb) if u.time_embed_act is not None else emb

    def _down(self, blocks, sample, emb, context) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        res = (sample,)
        for block in blocks:
            if getattr(block, "has_cross_attention", False):
                sample, out = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, out = block(hidden_states=sample, temb=emb)
            res += out
        return sample, res

    def _up(self, first: int, sample, res, emb, context, forward_size: bool, caches: dict | None = None) -> torch.Tensor:
        """Run ``up_blocks[first:]`` from ``sample``, consuming skip tensors from the end of ``res`` as diffusers does;
        ``forward_size``: pass each upsampler the size of the next skip tensor; ``caches``: filled with the input of
        every block run, keyed by its depth."""
        blocks = self.unet.up_blocks
        n = len(blocks)
        for k in range(first, n):
            block = blocks[k]
            if caches is not None:
                caches[n - k] = sample  # the input of up_blocks[k] is the cache of depth n - k
            n_res = len(block.resnets)
            skips, res = res[-n_res:], res[:-n_res]
            size = res[-1].shape[2:] if forward_size and k < n - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips,
                               encoder_hidden_states=context, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, upsample_size=size)
        return sample

    def _post(self, sample: torch.Tensor) -> torch.Tensor:
        u = self.unet
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)

    def _pre(self, sample, timestep):
        u = self.unet
        up_factor = 2 ** u.num_upsamplers
        forward_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        return self._embed(sample, timestep), u.conv_in(sample), forward_size

    def full(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
             all_depths: bool = False) -> tuple[torch.Tensor, torch.Tensor | dict[int, torch.Tensor]]:
        """The whole UNet: ``(ε [B, C_out, H, W], cache)``; with ``all_depths`` the cache of every depth ``{d: tensor}``."""
        u = self.unet
        emb, h, forward_size = self._pre(sample, timestep)
        h, res = self._down(u.down_blocks, h, emb, encoder_hidden_states)
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = u.mid_block(h, emb)
        caches: dict[int, torch.Tensor] = {}
        h = self._up(0, h, res, emb, encoder_hidden_states, forward_size, caches)
        return self._post(h), (caches if all_depths else caches[self.depth])

    def shallow(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, cache: torch.Tensor,
                depth: int | None = None) -> torch.Tensor:
        """ε ``[B, C_out, H, W]`` from the first ``depth`` down and last ``depth`` up blocks, the deeper part taken from
        ``cache`` (``depth``: default the split's)."""
        u, n = self.unet, num_levels(self.unet)
        d = self.depth if depth is None else check_depth(u, depth)
        emb, h, forward_size = self._pre(sample, timestep)
        _, res = self._down(u.down_blocks[:d], h, emb, encoder_hidden_states)
        res = res[: sum(len(b.resnets) for b in u.up_blocks[n - d:])]  # drop the last block's downsampler output
        h = self._up(n - d, cache, res, emb, encoder_hidden_states, forward_size)
        return self._post(h)


class FullPath(nn.Module):
    """``(sample, timestep, encoder_hidden_states) -> (latent, cache)``: the full path with the engines' I/O."""

    def __init__(self, split: SplitUNet):
        super().__init__()
        self.split = split

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.split.full(sample, timestep, encoder_hidden_states)


class ShallowPath(nn.Module):
    """``(sample, timestep, encoder_hidden_states, cache) -> latent``: the shallow path with the engines' I/O."""

    def __init__(self, split: SplitUNet):
        super().__init__()
        self.split = split

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                cache: torch.Tensor) -> torch.Tensor:
        return self.split.shallow(sample, timestep, encoder_hidden_states, cache)
