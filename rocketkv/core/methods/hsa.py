"""HSA: RocketKV's stage 2 (hybrid sparse attention) alone, over the whole sequence: nothing is evicted.

Per decode step, page min/max keys on the group's top-``r_h`` query channels (each channel's bound taken from the
max key where the group's summed query is positive, else the min) give approximate scores; the top ``k`` slots of
each KV group are then attended exactly.  RocketKV runs the same step over what its stage 1 kept.

Budget mapping on a capacity ``C`` (the whole sequence here, ``C = S``; RocketKV's stage-1 capacity there)::

    c2 = max(1, C/t)     p = ⌈√c2⌉ (1 if that exceeds c2)     r_h = ⌊d·p/c2⌋     k = ⌊t/2⌋
"""
import math
from dataclasses import dataclass

from rocketkv.core import kernels
from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import attend_indices, covers_sequence, seq_len_for_plan, topk_cost
from rocketkv.core.methods.pages import index_pages, table_bytes


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
        index_pages(layer, plan["page_size"], upto, self.kernels)

    def metadata_bytes(self, layer, plan):
        return table_bytes(layer, plan["page_size"])

    def step_cost(self, layer, plan):
        """Attended ``min(k, upto)``; read: the pages' bounds on r channels, then K/V of the attended slots."""
        p, r, hkv, d = plan["page_size"], plan["channels"], layer.keys.shape[1], layer.keys.shape[-1]
        return topk_cost(plan["topk"], lambda u, attended: hkv * ((u / p).ceil() * r + attended * 2 * d))

    def decode(self, layer, q, upto, plan, scaling):
        """Page space: every slot of a page shares its page's score, so the per-head softmax over slots averaged
        over the group is one value per live page (``kernels.hsa_page_probs``), and the top k slots are whole pages
        in (score desc, page asc) order plus the lowest slots of the page at the cut (``kernels.select_units``):
        the selection of the slot-space rule, ties to the lower slots.  On CUDA: five Triton launches per layer
        with ``index``'s fold (two are the sparse attention's), and nothing else."""
        p, k = plan["page_size"], plan["topk"]
        probs = kernels.hsa_page_probs(q, layer.meta["page_min_t"], layer.meta["page_max_t"], upto, p,
                                       plan["channels"], backend=self.kernels)  # [B,Hkv,P]
        idx = kernels.select_units(probs, upto, p, k, min(k, probs.shape[-1] * p), True, backend=self.kernels,
                                   masked=True)[0]  # pages past upto: probability 0
        out = attend_indices(layer, q, idx[:, :, None], scaling, self.kernels)
        return out, StepCost(self.step_cost(layer, plan), upto)
