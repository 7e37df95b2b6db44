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

from rocketkv import kernels
from rocketkv.methods.base import (Method, StepCost, attend_indices, ceil_div, covers_sequence, keep_selection,
                                   max_pool, mean_count, per_token_group_mean, register, seq_len_for_plan,
                                   token_sees, token_uptos, topk_slots, window_scores)
from rocketkv.methods.pages import index_pages, page_bounds_per_token, page_to_slots, token_rows
from rocketkv.methods.sparq import sparq_temperature


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
        keep = plan["prompt_budget"]
        if prompt_len <= keep:
            return
        scores = window_scores(q_window, layer.keys, prompt_len, self.window, scaling).sum(dim=2)
        chosen = max_pool(scores, self.kernel_size).topk(keep - self.window, dim=-1, sorted=False).indices
        keep_selection(layer, chosen, prompt_len - self.window)

    def index(self, layer, plan, upto=None):
        index_pages(layer, plan["page_size"], upto)

    def decode(self, layer, q, upto, plan, scaling):
        b, hkv, g, d = q.shape
        p = plan["page_size"]
        n_pages = ceil_div(upto, p)
        group_q = q.float().sum(dim=2)  # [B,Hkv,d]
        signs = torch.where(group_q > 0, 1.0, -1.0)
        channels = q.float().abs().sum(dim=2).topk(plan["channels"], dim=-1, sorted=False).indices  # [B,Hkv,r]
        page_logits = kernels.rocketkv_page_scores(
            q, layer.meta["page_min_t"][..., :n_pages], layer.meta["page_max_t"][..., :n_pages], channels,
            signs.gather(-1, channels), backend=self.kernels)  # [B,Hkv,g,P]
        tau = sparq_temperature(q, channels.unsqueeze(2).expand(b, hkv, g, channels.shape[-1]))
        token_logits = page_to_slots(page_logits, p, upto) / tau[..., None]
        probs = torch.softmax(token_logits, dim=-1).mean(dim=2, keepdim=True)  # [B,Hkv,1,S]
        idx = topk_slots(probs, plan["topk"])
        out = attend_indices(layer, q, idx, upto, scaling)
        attended = mean_count((idx >= 0).sum(-1))
        return out, StepCost(attended, hkv * (n_pages * plan["channels"] + attended * 2 * d))

    def decode_many(self, layer, q, first_slot, plan, scaling):
        b, hkv, g, n, d = q.shape
        p, upto = plan["page_size"], first_slot + n
        pages = page_bounds_per_token(layer, p, first_slot, n)
        q_tokens = q.permute(0, 3, 1, 2, 4).reshape(b * n, hkv, g, d)
        group_q = q_tokens.float().sum(dim=2)
        channels = q_tokens.float().abs().sum(dim=2).topk(plan["channels"], dim=-1, sorted=False).indices
        # The page bound on the chosen channels as two products over all d channels: a query entry pairs with the
        # page max where its group's sum is positive, else with the min, and unchosen channels are zeroed.  The
        # complete pages then need no per-token copy: all tokens' heads take one product with them.
        chosen = torch.zeros_like(group_q, dtype=torch.bool).scatter_(-1, channels, True)[:, :, None]
        positive = (group_q > 0)[:, :, None]
        q_max = q_tokens.float() * (chosen & positive)  # [B·n,Hkv,g,d]
        q_min = q_tokens.float() * (chosen & ~positive)
        rows = lambda t: t.view(b, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)  # noqa: E731
        fixed = (rows(q_max) @ pages.fixed_max.float() + rows(q_min) @ pages.fixed_min.float())
        fixed = fixed.view(b, hkv, g, n, -1).permute(0, 3, 1, 2, 4).flatten(0, 1)  # [B·n,Hkv,g,F]
        touched = q_max @ pages.touched_max.float() + q_min @ pages.touched_min.float()
        page_logits = torch.cat([fixed, touched], dim=-1)  # [B·n,Hkv,g,P]
        tau = sparq_temperature(q_tokens, channels.unsqueeze(2).expand(b * n, hkv, g, channels.shape[-1]))
        token_logits = (page_to_slots(page_logits, p, upto) / tau[..., None]).view(b, n, hkv, g, upto)
        future = ~token_sees(torch.arange(upto, device=q.device), first_slot, n)[None, :, None, None]
        probs = torch.softmax(token_logits.masked_fill(future, float("-inf")), dim=-1).mean(dim=3, keepdim=True)
        idx = topk_slots(probs.masked_fill(future, float("-inf")).flatten(0, 1), plan["topk"])  # [B·n,Hkv,1,k]
        out = attend_indices(layer, q.reshape(b, hkv, g * n, d), token_rows(idx, b, n, g), upto, scaling)
        attended = per_token_group_mean((idx >= 0).sum(-1), b, n)
        n_pages = torch.ceil(token_uptos(first_slot, n, q.device) / p)
        return out.view(b, hkv, g, n, d), StepCost(attended, hkv * (n_pages * plan["channels"] + attended * 2 * d))
