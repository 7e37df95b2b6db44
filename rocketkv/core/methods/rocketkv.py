"""RocketKV: stage 1 SnapKV-style eviction with group-wise selection and a wide max-pool, stage 2 hybrid sparse
attention over pages (min/max keys on the group's top-r query channels), then exact top-k attention.

Budget split for one sample (``t`` = budget, ``d`` = head dim)::

    S = min(prompt_len + max_new, model_max_len)     c = max(1, S/t)
    r = min(0.2 + 0.06·log2 c, 0.8)                  C = max(⌊S / c^r⌋, min(2·max_new, S))
    P = C − max_new (prompt tokens kept)             c2 = max(1, C/t)
    p = ⌈√c2⌉ (1 if that exceeds c2)                 r_h = ⌊d·p/c2⌋,  k = ⌊t/2⌋
"""
import math
from dataclasses import dataclass

import torch

from rocketkv.core import kernels
from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import (attend_indices, covers_sequence, keep_selection, max_pool, mean_count,
                                       seq_len_for_plan, topk_slots, valid_slots, window_scores)
from rocketkv.core.methods.pages import index_pages, table_bytes, page_to_slots
from rocketkv.core.methods.sparq import sparq_temperature


def rocketkv_budget(budget: int, prompt_len: int, max_new_tokens: int, head_dim: int,
                    model_max_len: int | None = None) -> dict:
    s = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
    c = max(1.0, s / budget)
    ratio = min(0.2 + 0.06 * math.log2(c), 0.8)
    capacity = max(math.floor(s / c**ratio), min(2 * max_new_tokens, s))
    c2 = max(1.0, capacity / budget)
    page_size = math.ceil(math.sqrt(c2))
    if page_size > c2:
        page_size = 1
    channels = min(head_dim, max(1, math.floor(head_dim * page_size / c2)))
    return {"capacity": capacity, "prompt_budget": capacity - max_new_tokens, "page_size": page_size,
            "channels": channels, "topk": budget // 2}


def stage1(layer, q_window, prompt_len: int, keep: int, window: int, kernel_size: int, scaling: float) -> None:
    """Stage 1 over slots ``[0, prompt_len)``: keep the ``keep - window`` prefix slots the last ``window`` queries
    attend to most (summed over the group's heads, max-pooled), the window, and every slot after the prompt."""
    if prompt_len <= keep:
        return
    scores = window_scores(q_window, layer.keys, prompt_len, window, scaling).sum(dim=2)
    chosen = max_pool(scores, kernel_size).topk(keep - window, dim=-1, sorted=False).indices
    keep_selection(layer, chosen, prompt_len - window)


@register
@dataclass
class RocketKV(Method):
    name = "rocketkv"
    kernel_size: int = 63

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        plan = rocketkv_budget(self.budget, prompt_len, max_new_tokens, head_dim, model_max_len)
        if plan["prompt_budget"] < self.window and prompt_len > plan["prompt_budget"]:
            raise ValueError(f"budget={self.budget}: RocketKV's prompt budget P={plan['prompt_budget']} is below the "
                             f"observation window w={self.window}; raise the budget or lower max_new_tokens")
        plan["dense"] = prompt_len <= plan["prompt_budget"] and covers_sequence(plan["topk"], prompt_len,
                                                                                 max_new_tokens)
        return plan

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        stage1(layer, q_window, prompt_len, plan["prompt_budget"], self.window, self.kernel_size, scaling)

    def index(self, layer, plan, upto=None):
        index_pages(layer, plan["page_size"], upto)

    def metadata_bytes(self, layer, plan):
        return table_bytes(layer, plan["page_size"])

    def decode(self, layer, q, upto, plan, scaling):
        b, hkv, g, d = q.shape
        p = plan["page_size"]
        group_q = q.float().sum(dim=2)  # [B,Hkv,d]
        signs = torch.where(group_q > 0, 1.0, -1.0)
        channels = q.float().abs().sum(dim=2).topk(plan["channels"], dim=-1, sorted=False).indices  # [B,Hkv,r]
        page_logits = kernels.rocketkv_page_scores(q, layer.meta["page_min_t"], layer.meta["page_max_t"], channels,
                                                   signs.gather(-1, channels), backend=self.kernels)  # [B,Hkv,g,P]
        tau = sparq_temperature(q, channels.unsqueeze(2).expand(b, hkv, g, channels.shape[-1]))
        valid = valid_slots(layer, upto)
        token_logits = (page_to_slots(page_logits, p, layer.capacity) / tau[..., None]).masked_fill_(~valid,
                                                                                                   float("-inf"))
        probs = torch.softmax(token_logits, dim=-1).mean(dim=2, keepdim=True)  # [B,Hkv,1,C]
        idx = topk_slots(probs.masked_fill_(~valid, float("-inf")), plan["topk"])
        out = attend_indices(layer, q, idx, scaling, self.kernels)
        attended = mean_count((idx >= 0).sum(-1))
        n_pages = (upto + p - 1) // p
        return out, StepCost(attended, hkv * (n_pages.double() * plan["channels"] + attended * 2 * d))
