"""Quest: pages with min/max keys; per step an upper bound per page, the best pages of each KV group attended exactly.

Budget split evenly: the approximation reads ``(S/p)·2d`` elements = ``t·d``, so ``p = ⌈2S/t⌉``, and the
attended tokens are ``k = t/2``.  ``page_size`` overrides ``p`` (original Quest: 16, budget = attended tokens).
"""
from dataclasses import dataclass

import torch

from rocketkv import kernels
from rocketkv.methods.base import (Method, StepCost, attend_indices, ceil_div, covers_sequence, mean_count, register,
                                   seq_len_for_plan, topk_slots)
from rocketkv.methods.pages import index_pages


def selected_pages(topk: int, page_size: int) -> int:
    return max(1, topk // page_size)


@register
@dataclass
class Quest(Method):
    name = "quest"
    page_size: int | None = None

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        if self.page_size is not None:
            page_size, topk = self.page_size, self.budget
        else:
            s = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
            page_size, topk = max(1, ceil_div(2 * s, self.budget)), self.budget // 2
        attended = selected_pages(topk, page_size) * page_size
        return {"page_size": page_size, "topk": topk, "dense": covers_sequence(attended, prompt_len, max_new_tokens)}

    def index(self, layer, plan, upto=None):
        index_pages(layer, plan["page_size"], upto)

    def decode(self, layer, q, upto, plan, scaling):
        p = plan["page_size"]
        n_pages = ceil_div(upto, p)
        pmin, pmax = layer.meta["page_min_t"][..., :n_pages], layer.meta["page_max_t"][..., :n_pages]
        bounds = kernels.quest_page_scores(q, pmin, pmax, backend=self.kernels)  # [B,Hkv,g,P]
        group_bounds = bounds.sum(dim=2, keepdim=True)  # pages chosen per KV group
        pages = topk_slots(group_bounds, selected_pages(plan["topk"], p))  # [B,Hkv,1,m]
        slots = (pages.unsqueeze(-1) * p + torch.arange(p, device=pages.device)).flatten(-2)
        slots = slots.masked_fill((pages.unsqueeze(-1) < 0).expand(*pages.shape, p).flatten(-2) | (slots >= upto), -1)
        out = attend_indices(layer, q, slots, upto, scaling)
        hkv, d = q.shape[1], q.shape[-1]
        attended = mean_count((slots >= 0).sum(-1))
        return out, StepCost(attended, hkv * (n_pages * 2 * d + attended * 2 * d))

