"""RocketKV: stage 1 SnapKV-style eviction with group-wise selection and a wide max-pool, stage 2 hybrid sparse
attention (``hsa``: page min/max keys on the group's top-r query channels, then exact top-k attention) over what
stage 1 kept.

Budget split for one sample (``t`` = budget, ``d`` = head dim)::

    S = min(prompt_len + max_new, model_max_len)     c = max(1, S/t)
    r = min(0.2 + 0.06·log2 c, 0.8)                  C = max(⌊S / c^r⌋, min(2·max_new, S))
    P = C − max_new (prompt tokens kept)             then stage 2 on C (``hsa.stage2_budget``)

``split_ratio`` fixes ``r`` instead (the paper's static-split ablation).  ``kernel_size: auto`` picks stage 1's
max-pool kernel from the prompt length by the ``adaptive_kernel_sizes`` table (SnapKV++'s adaptive pooling).
"""
import math
from dataclasses import dataclass

from rocketkv.core.methods.base import register
from rocketkv.core.methods.hsa import HybridSparseAttention, stage2_budget
from rocketkv.core.methods.ops import (ADAPTIVE_KERNEL_SIZES, check_pool_kernel, covers_sequence, keep_selection,
                                       max_pool, pool_kernel, seq_len_for_plan, window_scores)


def rocketkv_budget(budget: int, prompt_len: int, max_new_tokens: int, head_dim: int,
                    model_max_len: int | None = None, split_ratio: float | None = None) -> dict:
    s = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
    c = max(1.0, s / budget)
    ratio = min(0.2 + 0.06 * math.log2(c), 0.8) if split_ratio is None else split_ratio
    capacity = max(math.floor(s / c**ratio), min(2 * max_new_tokens, s))
    return {"split_ratio": ratio, "capacity": capacity, "prompt_budget": capacity - max_new_tokens,
            **stage2_budget(budget, capacity, head_dim)}


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
class RocketKV(HybridSparseAttention):
    name = "rocketkv"
    kernel_size: int | str = 63
    adaptive_kernel_sizes: tuple | list = ADAPTIVE_KERNEL_SIZES
    split_ratio: float | None = None  # None: the adaptive r above

    def __post_init__(self):
        super().__post_init__()
        check_pool_kernel(self.name, self.kernel_size, self.adaptive_kernel_sizes)
        r = self.split_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1):
            raise ValueError(f"method {self.name!r}: split_ratio={r!r} is not valid; give a number with "
                             f"0 < split_ratio < 1 (e.g. 0.3, 0.5, 0.7), or null for the adaptive split")

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        plan = rocketkv_budget(self.budget, prompt_len, max_new_tokens, head_dim, model_max_len, self.split_ratio)
        if plan["prompt_budget"] < self.window and prompt_len > plan["prompt_budget"]:
            raise ValueError(f"budget={self.budget}: RocketKV's prompt budget P={plan['prompt_budget']} is below the "
                             f"observation window w={self.window}; raise the budget or lower max_new_tokens")
        plan["kernel_size"] = pool_kernel(self.kernel_size, self.adaptive_kernel_sizes, prompt_len)
        plan["dense"] = prompt_len <= plan["prompt_budget"] and covers_sequence(plan["topk"], prompt_len,
                                                                                 max_new_tokens)
        return plan

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        stage1(layer, q_window, prompt_len, plan["prompt_budget"], self.window, plan["kernel_size"], scaling)
