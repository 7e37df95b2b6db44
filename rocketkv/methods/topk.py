"""Exact top-k oracle: per query head, exact scores over the whole cache, softmax over the best ``k = t`` only."""
from dataclasses import dataclass

import torch

from rocketkv.methods.base import (Method, StepCost, attend_indices, covers_sequence, hide_later_slots_, mean_count,
                                   per_token_mean, per_token_union, register, token_uptos, topk_slots, union_count,
                                   visible_mask)


@register
@dataclass
class ExactTopK(Method):
    name = "topk"

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        return {"topk": self.budget, "dense": covers_sequence(self.budget, prompt_len, max_new_tokens)}

    def decode(self, layer, q, upto, plan, scaling):
        keys = layer.keys[:, :, :upto]
        scores = torch.einsum("bhgd,bhsd->bhgs", q.float(), keys.float())
        vis = visible_mask(layer, upto)
        if vis is not None:
            scores.masked_fill_(~vis, float("-inf"))
        idx = topk_slots(scores, plan["topk"])  # [B,Hkv,g,k]: one set per query head
        out = attend_indices(layer, q, idx, upto, scaling)
        d, hkv = keys.shape[-1], keys.shape[1]
        values_read = union_count(idx, upto).float().sum().double() / q.shape[0]
        return out, StepCost(mean_count((idx >= 0).sum(-1)), upto * d * hkv + values_read * d)

    def decode_many(self, layer, q, first_slot, plan, scaling):
        b, hkv, g, n, d = q.shape
        upto = first_slot + n
        rows = q.reshape(b, hkv, g * n, d)
        scores = torch.einsum("bhrd,bhsd->bhrs", rows.float(), layer.keys[:, :, :upto].float())
        idx = topk_slots(hide_later_slots_(scores, first_slot, n, g, visible_mask(layer, upto)), plan["topk"])
        out = attend_indices(layer, rows, idx, upto, scaling)
        values_read = per_token_union(idx, g, n, upto) / b
        keys_read = token_uptos(first_slot, n, q.device) * (d * hkv)
        return out.view(b, hkv, g, n, d), StepCost(per_token_mean((idx >= 0).sum(-1), g, n), keys_read + values_read * d)
