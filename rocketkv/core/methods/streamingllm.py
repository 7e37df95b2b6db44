"""StreamingLLM (attention sinks, Xiao et al. 2024): the first ``sink`` tokens and the most recent ones.

Budget ``t`` = sink + recent per KV head.  After the prefill every KV head keeps the prompt's first ``sink`` slots
and its last ``t - sink``; each decode step attends the sinks and the latest ``t - sink`` stored slots, so the
window slides as tokens are generated and a step never attends more than ``t`` tokens.  The slide is a mask over the
slot index (slots are in position order: sinks first, then the window, then the new tokens), so a step has static
shapes and reads nothing back to the host; the buffer keeps the tokens that slid out until the sample ends (it is
sized for the planned steps), but no step reads them.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import covers_sequence, topk_cost


def sliding_mask(layer, upto: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """``[C]`` bool: the stored slots below ``upto`` that are a sink (slot < sink) or among the latest ``recent``."""
    slot = layer.slot_index
    return (slot < upto) & ((slot < sink) | (slot >= upto - recent))


def keep_sink_and_recent(layer, prompt_len: int, sink: int, recent: int) -> None:
    """Evict all but the first ``sink`` and the last ``recent`` of slots ``[0, prompt_len)`` (and any slot after)."""
    if prompt_len <= sink + recent:
        return
    b, hkv = layer.keys.shape[:2]
    device = layer.keys.device
    slots = torch.cat([torch.arange(sink, device=device),
                       torch.arange(prompt_len - recent, layer.stored, device=device)])
    layer.keep(slots.expand(b, hkv, -1))


def sliding_attention(layer, q: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact attention of ``q`` (``[B,Hkv,g,d]``) under ``mask`` (broadcast to ``[B,Hkv,g,C]``)."""
    return F.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=mask, scale=scaling)


@register
@dataclass
class StreamingLLM(Method):
    name = "streamingllm"
    sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        self._check_int_option("sink", 0)

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        if self.budget <= self.sink:
            raise ValueError(f"budget={self.budget} must exceed sink={self.sink} (budget = sink + recent tokens); "
                             f"use budget >= {self.sink + 1}")
        return {"sink": self.sink, "recent": self.budget - self.sink,
                "dense": covers_sequence(self.budget, prompt_len, max_new_tokens)}

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        keep_sink_and_recent(layer, prompt_len, plan["sink"], plan["recent"])

    def decode(self, layer, q, upto, plan, scaling):
        out = sliding_attention(layer, q, sliding_mask(layer, upto, plan["sink"], plan["recent"])[None], scaling)
        hkv, d = q.shape[1], q.shape[-1]
        # every head attends min(upto, t) slots: the sinks and the window, or all of them while they fit
        return out, StepCost(topk_cost(self.budget, lambda u, attended: attended * (2 * d * hkv)), upto)
