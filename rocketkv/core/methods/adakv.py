"""Ada-KV (Feng et al. 2024), GQA version (Ada-SnapKV): SnapKV's scores per KV head (summed over the group's query
heads, max-pooled), then one top-k over all KV heads of a layer together, so heads that concentrate their attention
give budget to heads that spread it.

Budget ``t`` per KV head: a layer keeps ``(t - w)·Hkv`` prefix tokens in all, each KV head at least
``floor(alpha·(t - w))`` of its own best (the paper's safeguard), plus the observation window ``w``.  The kept
counts differ per KV head: the layer stores each KV head's choice once, padded to the largest, and ``visible``
hides the padding.  Ties go to the lower head, then the lower position.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch

from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import (ADAPTIVE_KERNEL_SIZES, check_pool_kernel, dense_cost, dense_decode, max_pool,
                                       pool_kernel, topk_slots, window_scores)


def adaptive_selection(pooled: torch.Tensor, total: int, floor: int) -> torch.Tensor:
    """``[B,Hkv,L]`` bool: the prefix slots each KV head keeps.  Every head's best ``floor`` first, then the best
    ``total - Hkv·floor`` of the rest over all heads of the layer together."""
    b, hkv, n = pooled.shape
    chosen = torch.zeros(b, hkv, n + 1, dtype=torch.bool, device=pooled.device)
    if floor:
        chosen.scatter_(-1, topk_slots(pooled, floor) + 1, True)
    if total <= hkv * floor:
        return chosen[..., 1:]
    rest = pooled.masked_fill(chosen[..., 1:], float("-inf")).reshape(b, hkv * n)
    picked = topk_slots(rest, total - hkv * floor)  # flat indices, head-major: ties go to the lower head
    flat = torch.zeros(b, hkv * n + 1, dtype=torch.bool, device=pooled.device)
    flat.scatter_(-1, picked + 1, True)  # -1 pads land in column 0, dropped
    return flat[..., 1:].view(b, hkv, n) | chosen[..., 1:]


@register
@dataclass
class AdaKV(Method):
    name = "adakv"
    kernel_size: int | str = 7
    adaptive_kernel_sizes: tuple | list = ADAPTIVE_KERNEL_SIZES
    alpha: float = 0.2  # safeguard: each KV head keeps at least this share of the uniform prefix budget

    def __post_init__(self):
        super().__post_init__()
        check_pool_kernel(self.name, self.kernel_size, self.adaptive_kernel_sizes)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ValueError(f"method {self.name!r}: alpha={a!r} is not valid; give a number with 0 <= alpha <= 1")

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        if self.budget < self.window:
            raise ValueError(f"budget={self.budget} is below the observation window w={self.window}; use budget >= "
                             f"{self.window} or a smaller window")
        prefix = self.budget - self.window
        return {"prompt_budget": self.budget, "prefix_per_head": prefix,
                "floor_per_head": math.floor(self.alpha * prefix + 1e-9),
                "kernel_size": pool_kernel(self.kernel_size, self.adaptive_kernel_sizes, prompt_len),
                "dense": prompt_len <= self.budget}

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        if prompt_len <= plan["prompt_budget"]:
            return
        scores = window_scores(q_window, layer.keys, prompt_len, self.window, scaling).sum(dim=2)  # [B,Hkv,L-w]
        pooled = max_pool(scores, plan["kernel_size"])
        b, hkv, n = pooled.shape
        chosen = adaptive_selection(pooled, plan["prefix_per_head"] * hkv, plan["floor_per_head"])
        counts = chosen.sum(-1)
        width = int(counts.max())
        # each head's chosen slots first, in position order, then padding: a stable sort on "not chosen"
        order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        real = torch.arange(width, device=order.device) < counts[..., None]
        tail = torch.arange(n, layer.stored, device=order.device).expand(b, hkv, -1)
        slots = torch.cat([order, tail], dim=-1)
        g = q_window.shape[2]
        visible = torch.cat([real, torch.ones_like(tail, dtype=torch.bool)], dim=-1)
        layer.keep(slots, visible=visible[:, :, None].expand(b, hkv, g, -1))

    def decode(self, layer, q, upto, plan, scaling):
        out, cost = dense_decode(layer, q, upto, scaling, self.kernels)
        if layer.visible is None:
            return out, cost
        return out, StepCost(partial(own_slots_cost, layer), upto)


def own_slots_cost(layer, uptos: torch.Tensor) -> torch.Tensor:
    """Dense attention's static cost rows, with each KV head reading only the slots one of its heads sees."""
    rows = dense_cost(layer, uptos)
    b, d = layer.keys.shape[0], layer.keys.shape[-1]
    read = layer.visible.any(dim=2).double().sum(dim=(0, 1)).div(b).cumsum(0).cpu()[uptos - 1]
    rows[:, 1] = read * (2 * d)
    return rows
