"""Cross-attention hooks: a diffusers attention processor that exposes the pre-softmax scores and
the attention probabilities of every cross-attention layer of a UNet to user callbacks.

The processor is installed by :func:`cross_attention_hooks` for the duration of one model call
and removed afterwards. While no hook is set it hands every call to the layer's own processor,
so a model with hooks off computes exactly what it computes without diffmem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from diffmem.errors import ModelError

#: Processors whose arithmetic is plain ``softmax(Q K^T * scale) V`` (fused, sliced or not), so
#: recomputing the layer explicitly gives the same numbers. Anything else (IP-Adapter, added
#: key/value projections, custom LoRA processors) is refused when an attention hook is set.
PLAIN_PROCESSORS = frozenset({
    "AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU",
    "SlicedAttnProcessor", "FusedAttnProcessor2_0",
})


@dataclass(frozen=True)
class AttentionContext:
    """Where an attention hook is being called from.

    Scores and probabilities handed to hooks have shape ``(B * heads, Q, K)``: batch row ``b`` of
    the UNet input owns rows ``b * heads ... (b + 1) * heads - 1`` (diffusers' head-to-batch
    layout). :meth:`per_head` expands a per-row tensor to that layout.

    Attributes
    ----------
    layer : str
        Module name of the cross-attention layer in the UNet, e.g.
        ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``.
    step_index : int or None
        Index of the sampling step (0 = first, noisiest); None outside
        :meth:`~diffmem.models.DiffusionModelAdapter.sample` (a bare ``predict_noise`` call).
    timestep : int
        Diffusion timestep of this call (the first row's when a call mixes timesteps).
    heads : int
        Number of attention heads of the layer.
    is_conditional : torch.Tensor
        Bool ``(B,)``: True for rows conditioned on the prompt, False for the unconditional
        (empty or negative prompt) branch of classifier-free guidance.
    token_mask : torch.Tensor or None
        ``(B, K)`` with 1 at real token positions (BOS, prompt, EOS) and 0 at padding, when
        known; keys beyond the mask are padding. None when the caller did not give one.
    query_shape : tuple of int or None
        ``(h, w)`` of the layer's spatial grid (``h * w = Q``), when it can be inferred.
    """

    layer: str
    step_index: int | None
    timestep: int
    heads: int
    is_conditional: torch.Tensor
    token_mask: torch.Tensor | None = None
    query_shape: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        """Number of UNet input rows ``B`` (not multiplied by heads)."""
        return int(self.is_conditional.shape[0])

    @property
    def prompt_lengths(self) -> torch.Tensor | None:
        """``(B,)`` number of real tokens per row (specials included), or None."""
        return None if self.token_mask is None else self.token_mask.sum(dim=1)

    @property
    def conditional_rows(self) -> torch.Tensor:
        """Bool ``(B * heads,)``: which rows of the scores belong to the conditional branch."""
        return self.per_head(self.is_conditional)

    def per_head(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat a per-row tensor ``(B, ...)`` to the scores' layout ``(B * heads, ...)``."""
        return x.repeat_interleave(self.heads, dim=0)


@dataclass
class AttentionState:
    """What the processors of one model call share: the hooks and the call's context.

    The adapter fills it before each UNet call; processors read it. Not part of the public API.
    """

    logits_hook: Callable[[torch.Tensor, AttentionContext], torch.Tensor] | None = None
    probs_hook: Callable[[torch.Tensor, AttentionContext], Any] | None = None
    step_index: int | None = None
    timestep: int = 0
    is_conditional: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    latent_hw: tuple[int, int] | None = None
    layers: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.logits_hook is not None or self.probs_hook is not None

    def context(self, layer: str, heads: int, batch_size: int, n_queries: int) -> AttentionContext:
        is_cond = self.is_conditional
        if is_cond is None or is_cond.shape[0] != batch_size:
            raise ModelError(
                f"attention layer {layer!r} received a batch of {batch_size} rows but the call "
                f"declared {None if is_cond is None else is_cond.shape[0]} conditional flags; "
                "pass `conditional` with one flag per row of x_t")
        return AttentionContext(layer=layer, step_index=self.step_index, timestep=self.timestep,
                                heads=heads, is_conditional=is_cond, token_mask=self.token_mask,
                                query_shape=_query_shape(self.latent_hw, n_queries))


def _query_shape(latent_hw: tuple[int, int] | None, n_queries: int) -> tuple[int, int] | None:
    """The (h, w) grid of a layer with ``n_queries`` positions, from the latent's (h, w)."""
    if latent_hw is None:
        return None
    h, w = latent_hw
    factor = math.sqrt(h * w / n_queries)
    gh, gw = round(h / factor), round(w / factor)
    return (gh, gw) if gh * gw == n_queries else None


class HookedCrossAttnProcessor:
    """Cross-attention that shows its scores to hooks; otherwise defers to the layer's processor.

    With a hook set the layer is recomputed explicitly,
    ``softmax(hook(Q K^T * scale + mask)) V``, mirroring diffusers' ``AttnProcessor``
    (group/spatial norms, cross norm, upcasting, residual and output rescaling included).

    Parameters
    ----------
    base : callable
        The processor the layer had before; used whenever no hook is set.
    name : str
        Module name of the layer, reported in :class:`AttentionContext`.
    state : AttentionState
        Shared hooks and call context.
    """

    def __init__(self, base: Any, name: str, state: AttentionState):
        self.base = base
        self.name = name
        self.state = state

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if not self.state.active or encoder_hidden_states is None:
            return self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, temb=temb, **kwargs)
        return self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _explicit(self, attn: Any, hidden_states: torch.Tensor,
                  encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  temb: torch.Tensor | None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, key_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        n_queries = query.shape[2]
        query = query.reshape(batch_size * heads, n_queries, head_dim)
        key = key.reshape(batch_size * heads, key_len, head_dim)
        value = value.reshape(batch_size * heads, key_len, head_dim)

        # scores = Q K^T * scale (+ additive mask), as Attention.get_attention_scores computes them
        out_dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.bmm(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        # hooks read and edit float32 scores and probabilities whatever the model's dtype (scores
        # built on them accumulate in float32); a float32 model is unchanged
        scores = scores.float()

        ctx = self.state.context(self.name, heads, batch_size, n_queries)
        if self.state.logits_hook is not None:
            new_scores = self.state.logits_hook(scores, ctx)
            if not isinstance(new_scores, torch.Tensor) or new_scores.shape != scores.shape:
                raise ModelError(
                    f"attention_logits hook must return a tensor of shape {tuple(scores.shape)}; "
                    f"got {type(new_scores).__name__} "
                    f"{tuple(new_scores.shape) if isinstance(new_scores, torch.Tensor) else ''}")
            scores = new_scores
        probs = scores.softmax(dim=-1)
        if self.state.probs_hook is not None:
            self.state.probs_hook(probs, ctx)
        probs = probs.to(out_dtype)

        hidden_states = torch.bmm(probs, value.to(out_dtype))
        hidden_states = (hidden_states.view(batch_size, heads, n_queries, head_dim)
                         .transpose(1, 2).reshape(batch_size, n_queries, heads * head_dim))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[str, Any]]:
    """The cross-attention modules of ``unet`` (``attn2`` of each transformer block), by name."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules()
            if isinstance(m, Attention) and m.is_cross_attention]


@contextmanager
def cross_attention_hooks(unet: torch.nn.Module, state: AttentionState) -> Iterator[list[str]]:
    """Install :class:`HookedCrossAttnProcessor` on every cross-attention layer, then restore.

    Parameters
    ----------
    unet : torch.nn.Module
        A diffusers UNet (``UNet2DConditionModel``).
    state : AttentionState
        The hooks and call context the processors read.

    Yields
    ------
    list of str
        Names of the hooked layers.

    Raises
    ------
    ModelError
        When the UNet has no cross-attention layer, or a layer uses a processor whose arithmetic
        is not plain attention (the hooks would silently change what it computes).
    """
    layers = cross_attention_layers(unet)
    if not layers:
        raise ModelError(f"{type(unet).__name__} has no cross-attention layer; attention hooks "
                         "need a text-conditioned UNet (UNet2DConditionModel)")
    for name, module in layers:
        kind = type(module.processor).__name__
        if kind not in PLAIN_PROCESSORS or module.added_kv_proj_dim is not None:
            raise ModelError(
                f"attention hooks cannot be applied to layer {name!r}: its processor {kind} is "
                f"not plain attention (supported: {', '.join(sorted(PLAIN_PROCESSORS))}); call "
                "unet.set_default_attn_processor() first, or sample without attention hooks")
    originals = [(module, module.processor) for _, module in layers]
    state.layers = [name for name, _ in layers]
    try:
        for (name, module), (_, base) in zip(layers, originals):
            module.set_processor(HookedCrossAttnProcessor(base, name, state))
        yield state.layers
    finally:
        for module, base in originals:
            module.set_processor(base)
