"""Exact top-k oracle: per query head, exact scores over the whole cache, softmax over the best ``k = t`` only."""
from dataclasses import dataclass

import torch

from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import attend_indices, covers_sequence, mean_count, topk_slots, union_count, visible_mask


@register
@dataclass
class ExactTopK(Method):
    name = "topk"

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        return {"topk": self.budget, "dense": covers_sequence(self.budget, prompt_len, max_new_tokens)}

    def decode(self, layer, q, upto, plan, scaling):
        scores = torch.einsum("bhgd,bhsd->bhgs", q.float(), layer.keys.float())
        scores.masked_fill_(~visible_mask(layer, upto), float("-inf"))
        idx = topk_slots(scores, plan["topk"])  # [B,Hkv,g,k]: one set per query head
        out = attend_indices(layer, q, idx, scaling, self.kernels)
        b, hkv, _, d = q.shape
        values_read = union_count(idx, layer.capacity).float().sum().double() / b
        return out, StepCost(mean_count((idx >= 0).sum(-1)), upto.double() * (d * hkv) + values_read * d)
