"""Quest: pages with min/max keys; per step an upper bound per page, the best pages of each KV group attended exactly.

Budget split evenly: the approximation reads ``(S/p)·2d`` elements = ``t·d``, so ``p = ⌈2S/t⌉``, and the
attended tokens are ``k = t/2``.  ``page_size`` overrides ``p`` (original Quest: 16, budget = attended tokens).

Quest never attends more than ``k`` tokens a step: it selects ``⌊k/p⌋`` whole pages, and once ``⌈2S/t⌉`` exceeds
``k`` (``S > t²/4``) the page size is capped at ``k`` (one page of ``k`` tokens).  Selection stays page-granular;
what gives is the approximation, which then reads ``(S/k)·2d`` elements, more than ``t·d`` (the statistics count
it).  The plan records ``selected_pages`` and ``page_size_capped``.
"""
from dataclasses import dataclass
from functools import partial

import torch

from rocketkv.core import kernels
from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import attend_indices, ceil_div, covers_sequence, seq_len_for_plan
from rocketkv.core.methods.pages import index_pages, table_bytes


def selected_pages(topk: int, page_size: int) -> int:
    if page_size > topk:
        raise ValueError(f"Quest plan: page_size={page_size} exceeds topk={topk}; a page must fit the attended tokens")
    return topk // page_size


@register
@dataclass
class Quest(Method):
    name = "quest"
    page_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        p = self.page_size
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= self.budget):
            raise ValueError(f"method {self.name!r}: page_size={p!r} is not valid; give an integer from 1 to the "
                             f"budget ({self.budget}: a page must fit the attended tokens), or null for "
                             f"p = min(ceil(2S/t), t/2)")

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        if self.page_size is not None:
            page_size, topk = self.page_size, self.budget
        else:
            s = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
            page_size, topk = max(1, ceil_div(2 * s, self.budget)), self.budget // 2
        capped = page_size > topk
        page_size = min(page_size, topk)
        pages = selected_pages(topk, page_size)
        return {"page_size": page_size, "topk": topk, "selected_pages": pages, "page_size_capped": capped,
                "dense": covers_sequence(pages * page_size, prompt_len, max_new_tokens)}

    def index(self, layer, plan, upto=None):
        index_pages(layer, plan["page_size"], upto, self.kernels)

    def metadata_bytes(self, layer, plan):
        return table_bytes(layer, plan["page_size"])

    def decode(self, layer, q, upto, plan, scaling):
        p = plan["page_size"]
        m = selected_pages(plan["topk"], p)
        bounds = kernels.quest_group_scores(q, layer.meta["page_min_t"], layer.meta["page_max_t"], upto, p,
                                            backend=self.kernels)  # [B,Hkv,P]: the group's pages, -inf past upto
        slots, count, _ = kernels.select_units(bounds, upto, p, m, min(m, bounds.shape[-1]) * p, False,
                                               backend=self.kernels, masked=True)  # the best m pages' slots
        out = attend_indices(layer, q, slots[:, :, None], scaling, self.kernels)
        b, hkv, _, d = q.shape
        static = partial(_page_reads, hkv * 2 * d, p)
        # attended: the chosen pages' slots below upto (the newest page may be among them, partly filled)
        return out, StepCost(static, upto, count.sum(), (1 / (b * hkv), 2 * d / b))


def _page_reads(per_page: int, page_size: int, uptos: torch.Tensor) -> torch.Tensor:
    """Static cost rows of Quest: the bounds of every live page (attended tokens are data-dependent)."""
    u = uptos.double()
    return torch.stack([torch.zeros_like(u), (u / page_size).ceil() * per_page], dim=-1)
