"""Exact top-k oracle: per query head, exact scores over the whole cache, softmax over the best ``k = t`` only."""
from dataclasses import dataclass

from rocketkv.core import kernels
from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import attend_indices, covers_sequence, topk_cost


@register
@dataclass
class ExactTopK(Method):
    name = "topk"

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        return {"topk": self.budget, "dense": covers_sequence(self.budget, prompt_len, max_new_tokens)}

    def decode(self, layer, q, upto, plan, scaling):
        b, hkv, g, d = q.shape
        k, slots = plan["topk"], layer.capacity
        # fp32 scores from the cache as stored (no up-cast copy of K), -inf from upto on
        scores = kernels.slot_scores(q, layer.keys, upto, backend=self.kernels)  # [B,Hkv,g,C]
        idx = kernels.select_units(scores.view(b, hkv * g, slots), upto, 1, k, min(k, slots), False,
                                   backend=self.kernels, masked=True)[0].view(b, hkv, g, -1)  # one set per head
        out = attend_indices(layer, q, idx, scaling, self.kernels, logits=scores)
        # read: K of every slot, then V of the union of the group's sets
        static = topk_cost(k, lambda u, attended: u * (d * hkv))
        reads = kernels.union_reads(idx, upto, 1, slots, backend=self.kernels).sum()
        return out, StepCost(static, upto, reads, (0.0, d / b))
