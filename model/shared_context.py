"""Cross-attention to a shared text context without copying it per frame and per pixel.

diffusers' spatio-temporal blocks were written for SVD's single image token: the spatial transformers get
the context repeated for every frame (B*T rows) and the temporal transformers get the first frame's
context broadcast to every pixel and materialised (B*H*W rows), then project keys and values for each copy.
With 77 CLIP text tokens that is most of the cross-attention work, repeated T or H*W times.

Here the context stays (B, L, D). `SharedContextAttnProcessor` accepts a query batch that is a whole
multiple k of the context batch (rows [g*k, (g+1)*k) share context g), computes K/V once per context row
and folds the k query rows into the query length, so the attention is one standard SDPA call with batch B.
`SharedContextTransformer` is diffusers' `TransformerSpatioTemporalModel` with the temporal context passed
compact; `VideoUNet` installs both (and falls back to the copying path when a user sets other processors).
The numbers are the same as diffusers' (tests/test_model_unet.py checks SVD checkpoint parity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModelOutput,
)


class SharedContextAttnProcessor:
    """Attention where groups of query rows share one context row (K/V computed once per group)."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs
                 ) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("SharedContextAttnProcessor supports plain (un-normalised, unmasked) attention only")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        rows, length, _ = hidden_states.shape
        groups = context.shape[0]
        if rows % groups:
            raise ValueError(f"query batch {rows} is not a multiple of the context batch {groups}")
        share = rows // groups
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = query.shape[-1] // heads
        # (G*k, N, H*d) -> (G, H, k*N, d): the k rows of a group become one long query sequence
        query = query.view(groups, share, length, heads, head_dim).permute(0, 3, 1, 2, 4)
        query = query.reshape(groups, heads, share * length, head_dim)
        key = key.view(groups, -1, heads, head_dim).transpose(1, 2)
        value = value.view(groups, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.view(groups, heads, share, length, head_dim).permute(0, 2, 3, 1, 4)
        out = out.reshape(rows, length, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class SharedContextTransformer(TransformerSpatioTemporalModel):
    """`TransformerSpatioTemporalModel` whose context may come compact: (B, L, D) for all frames, or
    (B*T, L, D) per frame. The temporal blocks get the first frame's context as (B, L, D), not copied
    to every pixel."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                image_only_indicator: torch.Tensor | None = None, return_dict: bool = True):
        batch_frames, _, height, width = hidden_states.shape
        num_frames = image_only_indicator.shape[-1]
        batch_size = batch_frames // num_frames
        if encoder_hidden_states.shape[0] == batch_size:
            time_context = encoder_hidden_states
        else:
            time_context = encoder_hidden_states.reshape(batch_size, num_frames, *encoder_hidden_states.shape[1:])[:, 0]
        if not isinstance(self.temporal_transformer_blocks[0].attn2.processor, SharedContextAttnProcessor):
            # another processor (set by the user) expects diffusers' layout: one context row per pixel
            time_context = time_context[:, None].expand(batch_size, height * width, *time_context.shape[1:])
            time_context = time_context.reshape(batch_size * height * width, *time_context.shape[2:])

        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch_frames, height * width, inner_dim)
        hidden_states = self.proj_in(hidden_states)

        frame_index = torch.arange(num_frames, device=hidden_states.device).repeat(batch_size)
        emb = self.time_pos_embed(self.time_proj(frame_index).to(dtype=hidden_states.dtype))[:, None, :]

        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks, strict=True):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, None, encoder_hidden_states,
                                                                  None)
            else:
                hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
            hidden_states_mix = temporal_block(hidden_states + emb, num_frames=num_frames,
                                               encoder_hidden_states=time_context)
            hidden_states = self.time_mixer(x_spatial=hidden_states, x_temporal=hidden_states_mix,
                                            image_only_indicator=image_only_indicator)

        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_frames, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
        output = hidden_states + residual
        return TransformerTemporalModelOutput(sample=output) if return_dict else (output,)


def install_shared_context(model: torch.nn.Module) -> None:
    """Swap in the compact-context transformer and processors (same weights, same outputs)."""
    for module in model.modules():
        if type(module) is TransformerSpatioTemporalModel:
            module.__class__ = SharedContextTransformer
    for name, module in model.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):
            module.set_processor(SharedContextAttnProcessor())


def uses_shared_context(model: torch.nn.Module) -> bool:
    """True while every cross-attention still runs SharedContextAttnProcessor (users may set others)."""
    found = False
    for name, module in model.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):
            if not isinstance(module.processor, SharedContextAttnProcessor):
                return False
            found = True
    return found
