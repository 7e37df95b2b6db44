"""HSA: RocketKV's stage 2 (hybrid sparse attention) alone, over the whole sequence: nothing is evicted.

Per decode step, page min/max keys on the group's top-``r_h`` query channels (each channel's bound taken from the
max key where the group's summed query is positive, else the min) give approximate scores; the top ``k`` slots of
each KV group are then attended exactly.  RocketKV runs the same step over what its stage 1 kept.

Budget mapping on a capacity ``C`` (the whole sequence here, ``C = S``; RocketKV's stage-1 capacity there)::

    c2 = max(1, C/t)     p = ⌈√c2⌉ (1 if that exceeds c2)     r_h = ⌊d·p/c2⌋     k = ⌊t/2⌋
"""
import math
from dataclasses import dataclass

import torch

from rocketkv.core import kernels
from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import (attend_indices, covers_sequence, mean_count, seq_len_for_plan, topk_slots,
                                       valid_slots)
from rocketkv.core.methods.pages import index_pages, page_to_slots, table_bytes
from rocketkv.core.methods.sparq import sparq_temperature


def stage2_budget(budget: int, capacity: int, head_dim: int) -> dict:
    """Page size, channels and top-k of hybrid sparse attention over ``capacity`` stored tokens."""
    c2 = max(1.0, capacity / budget)
    page_size = math.ceil(math.sqrt(c2))
    if page_size > c2:
        page_size = 1
    channels = min(head_dim, max(1, math.floor(head_dim * page_size / c2)))
    return {"page_size": page_size, "channels": channels, "topk": budget // 2}


@register
@dataclass
class HybridSparseAttention(Method):
    name = "hsa"

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        capacity = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
        plan = {"capacity": capacity, **stage2_budget(self.budget, capacity, head_dim)}
        plan["dense"] = covers_sequence(plan["topk"], prompt_len, max_new_tokens)
        return plan

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
