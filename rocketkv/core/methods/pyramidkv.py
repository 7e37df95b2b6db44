"""PyramidKV (Cai et al. 2024): SnapKV's selection with per-layer budgets that fall linearly from the lower layers
to the upper ones; the observation window is kept on every layer.

With ``m`` = the prompt budget less the window (SnapKV's per query head or per KV head, ``selection``), the lowest
layer keeps ``2m - m/beta`` prefix tokens and the top layer ``m/beta``, linearly in between (floored, the tokens the
floors lose given to the lowest layers), so the mean over layers is exactly ``m``: the budget is SnapKV's, averaged
over layers.  As in PyramidKV's code, a prompt that fits the mean budget is not compressed at all.
"""
from dataclasses import dataclass

from rocketkv.core.methods.base import register
from rocketkv.core.methods.ops import keep_selection, max_pool, topk_slots, window_scores
from rocketkv.core.methods.snapkv import SnapKV


def pyramid_budgets(prefix: int, num_layers: int, beta: int) -> list[int]:
    """Prefix tokens kept per layer, lowest layer first: linear from ``2·prefix - prefix//beta`` down to
    ``prefix//beta``, summing to ``num_layers · prefix``."""
    if num_layers == 1:
        return [prefix]
    low = prefix // beta
    high = 2 * prefix - low
    budgets = [(high * (num_layers - 1) - (high - low) * i) // (num_layers - 1) for i in range(num_layers)]
    for i in range(num_layers * prefix - sum(budgets)):
        budgets[i] += 1
    return budgets


@register
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        self._check_int_option("beta", 1, " (the top layer keeps 1/beta of the mean prefix budget)")

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size: int = 1):
        plan = super().plan(prompt_len, max_new_tokens, head_dim, model_max_len, group_size)
        prefix = plan["prompt_budget"] - self.window
        plan.update(beta=self.beta, prefix_mean=prefix, prefix_top=prefix // self.beta,
                    prefix_bottom=2 * prefix - prefix // self.beta)
        return plan

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        if prompt_len <= plan["prompt_budget"]:
            return
        n_prefix = pyramid_budgets(plan["prefix_mean"], len(layer.state.layers), self.beta)[layer.layer_idx]
        n_prefix = min(n_prefix, prompt_len - self.window)
        if n_prefix == 0:  # a top layer of a small budget keeps the window alone
            keep_selection(layer, layer.positions.new_empty(*layer.keys.shape[:2], 0), prompt_len - self.window)
            return
        scores = window_scores(q_window, layer.keys, prompt_len, self.window, scaling)  # [B,Hkv,g,L-w]
        if self.selection == "group":
            chosen = topk_slots(max_pool(scores.sum(dim=2), plan["kernel_size"]), n_prefix)  # ties: lower slots
            keep_selection(layer, chosen, prompt_len - self.window)
            return
        per_head = topk_slots(max_pool(scores, plan["kernel_size"]), n_prefix)
        self._keep_per_head(layer, per_head, prompt_len)
