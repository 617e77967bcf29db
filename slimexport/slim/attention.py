"""The slim attention processor: per-head query/key size ``rank_qk``, value size ``rank_vo``, original scale.

The stock diffusers processors reshape q, k and v with one shared ``head_dim = inner_dim // heads`` and use
SDPA's default scale ``1/sqrt(head_dim)``. After whitening-SVD the query/key width per head (``rank_qk``) and
the value width (``rank_vo``) differ from the original head size ``d`` and from each other, while the logits
were approximated at the *original* scale ``d**-0.5``. This processor reads both ranks from the layer shapes
and passes the original scale to SDPA explicitly. It is installed with ``Attention.set_processor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SlimAttnProcessor:
    """Attention with decoupled head sizes.

    Args:
        scale: the softmax scale of the *dense* layer (``original_head_dim ** -0.5``).
        kernel: optional callable ``(q, k, v, scale) -> o`` on ``[B, H, N, r]`` tensors; ``None`` uses
            ``F.scaled_dot_product_attention`` (always the case for ONNX export).
    """

    def __init__(self, scale: float, kernel=None):
        self.scale = float(scale)
        self.kernel = kernel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        rank_qk = query.shape[-1] // heads
        rank_vo = value.shape[-1] // heads
        query = query.view(batch, -1, heads, rank_qk).transpose(1, 2)
        key = key.view(batch, -1, heads, rank_qk).transpose(1, 2)
        value = value.view(batch, -1, heads, rank_vo).transpose(1, 2)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        if self.kernel is not None and attention_mask is None and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            out = self.kernel(query, key, value, self.scale)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * rank_vo).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
