"""The attention and mask functions transformers calls under the name ``rocketkv``.

Registered with ``AttentionInterface`` / ``AttentionMaskInterface``; a model runs them once
``set_attn_implementation("rocketkv")`` is set (``compress`` does).  transformers hands the forward pass's
keyword arguments on to every attention call; the session's pre-forward hook adds the compressed cache
under ``CACHE_KWARG``, and the attention module's ``layer_idx`` picks its layer.

Prefill attention is exact and dense.  After it each layer is compressed by its method; the prompt's last
token is then the first decode step.  A later turn of a conversation is a prefill again for a layer that kept its
history (``CompressedLayer.begin_turn``): its queries attend densely to the whole history and the method compresses
it afresh; every other layer decodes the turn's tokens one step at a time.  A forward that feeds several tokens after the prefill decodes them one
step at a time, token i seeing the slots up to its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from rocketkv.core.cache import CompressedLayer

ATTN_NAME = "rocketkv"
CACHE_KWARG = "rocketkv_cache"


@torch.compiler.disable  # a compiled decode step (method.compile) runs it eagerly: it keeps host bookkeeping
def rocketkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if CACHE_KWARG not in kwargs:
        raise RuntimeError(f"{type(module).__name__} does not pass the forward's keyword arguments on to its "
                           "attention function; rocketkv supports models that do (Llama, Mistral, Qwen2, ...)")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache = kwargs[CACHE_KWARG]
    if cache is None:  # use_cache=False: plain causal attention, queries aligned to the last keys
        out = _dense_causal(query, key, value, scaling)
    else:
        layer = cache.layers[module.layer_idx]
        if layer.keys is not key:
            raise RuntimeError(f"layer {module.layer_idx} attends to keys its compressed cache did not return")
        out = _attend(layer, query, scaling)
    return out.transpose(1, 2).contiguous(), None


def rocketkv_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Masks are built from stored positions inside the attention function; only padding is refused here."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise NotImplementedError("padded batches are not supported with a compressed KV cache; "
                                  "run one sequence at a time (batch size 1) or equal-length sequences")
    return None


AttentionInterface.register(ATTN_NAME, rocketkv_attention)
AttentionMaskInterface.register(ATTN_NAME, rocketkv_mask)


def _dense_causal(query, key, value, scaling):
    n, s = query.shape[-2], key.shape[-2]
    mask = torch.ones(n, s, dtype=torch.bool, device=query.device).tril(s - n)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=key.shape[1] != query.shape[1])


def _attend(layer: CompressedLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    b, hq, n, d = query.shape
    hkv = layer.keys.shape[1]
    q = query.reshape(b, hkv, hq // hkv, n, d)  # the g query heads of each KV head together: K/V never repeated
    if not layer.compressed:
        return _prefill(layer, query, q, scaling)
    return _decode(layer, q, scaling)


def _prefill(layer: CompressedLayer, query: torch.Tensor, q: torch.Tensor, scaling: float) -> torch.Tensor:
    state = layer.state
    n = query.shape[2]
    if state.plan is None:
        state.prompt_len = state.prompt_len or n
        state.group_size = q.shape[2]
        state.element_size = layer.keys.element_size()
        state.plan = state.method.plan(state.prompt_len, state.max_new_tokens, q.shape[-1], state.model_max_len,
                                       group_size=state.group_size)
    method = state.method_for(layer.layer_idx)
    split = n - 1 if method.decode_last_prompt_token and state.split_prefill and n >= 2 else n
    # slots before this forward: none at the first prefill; the whole history at a later turn's (``begin_turn``)
    offset = layer.stored - n
    if state.capture_window:
        # a copy: a view would keep every prefill query of the layer alive for as long as the shared cache
        layer.captured_q = q[..., max(0, split - state.capture_window):split, :].clone()
        layer.captured_scaling = scaling
    causal = None if offset == 0 else \
        layer.slot_index[:offset + split] <= offset + torch.arange(split, device=query.device)[:, None]
    prefix_out = F.scaled_dot_product_attention(query[:, :, :split], layer.keys[:, :, :offset + split],
                                                layer.values[:, :, :offset + split], attn_mask=causal,
                                                is_causal=causal is None, scale=scaling,
                                                enable_gqa=layer.keys.shape[1] != query.shape[1])
    compress_layer(layer, q[..., :split, :], offset + split, scaling)
    if split == n:
        return prefix_out
    return torch.cat([prefix_out, _decode(layer, q[:, :, :, split:], scaling)], dim=2)


def compress_layer(layer: CompressedLayer, q_window: torch.Tensor, prompt_len: int, scaling: float) -> None:
    """Run the layer's method over the exact prefill of slots ``[0, prompt_len)``, give the layer room for the
    planned decode steps and build the method's metadata of the prompt's slots; decode steps follow."""
    state = layer.state
    method = state.method_for(layer.layer_idx)
    method.compress(layer, q_window, prompt_len, state.plan, scaling)
    layer.compressed = True
    prompt_slots = layer.stored - (layer.seen - prompt_len)  # tokens after the prompt are the last slots
    in_prompt = layer.positions[..., :prompt_slots] >= 0
    if layer.visible is not None:
        in_prompt = in_prompt & layer.visible[..., :prompt_slots].any(dim=2)
    layer.kept_after_prefill = in_prompt.sum(-1).float().mean().item()
    layer.reserve(prompt_slots)
    method.index(layer, state.plan, prompt_slots)


def _decode(layer: CompressedLayer, q: torch.Tensor, scaling: float) -> torch.Tensor:
    """Decode-mode attention for the ``n`` newest stored slots, one step per token: token i sees the slots up to
    its own and metadata built from those slots only.  Slot counts are device scalars (``layer.length``), so
    nothing here depends on host state a replayed CUDA graph would not update."""
    state = layer.state
    method = state.method_for(layer.layer_idx)
    b, hkv, g, n, d = q.shape
    outs = []
    for i in range(n):
        upto = layer.length if i == n - 1 else layer.length - (n - 1 - i)
        method.index(layer, state.plan, upto)
        out, cost = method.decode(layer, q[:, :, :, i], upto, state.plan, scaling)
        state.stats.record(layer, layer.stored - (n - 1 - i), cost)
        outs.append(out)
    out = outs[0].unsqueeze(3) if n == 1 else torch.stack(outs, dim=3)  # [B,Hkv,g,n,d]
    return out.reshape(b, hkv * g, n, d)
