"""SparQ: approximate scores on the top-r channels of |q|, exact attention on the top-k tokens, mean-value
reallocation ``y = α·y_k + (1−α)·mean(V)``.  Budget: ``r = max(1, round(d·t/S))``, ``k = t/2``."""
from dataclasses import dataclass

import torch

from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import (attend_indices, covers_sequence, mean_count, seq_len_for_plan, topk_slots,
                                       union_count, visible_mask)


def sparq_temperature(q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``sqrt(d · ‖q_I‖₁ / ‖q‖₁)`` per head; ``channels`` indexes the last axis of ``q``.

    A head whose ``q_I`` is all zero (an all-zero query, e.g. from an all-zero embedding row) gets 1: its
    approximate logits are all 0 then, so any positive temperature gives the same uniform scores (and a tie cut at
    the lowest slots), where 0 would give 0/0 = NaN and select nothing."""
    abs_q = q.float().abs()
    tau = torch.sqrt(q.shape[-1] * abs_q.gather(-1, channels).sum(-1) / abs_q.sum(-1).clamp_min(1e-30))
    return torch.where(tau > 0, tau, torch.ones_like(tau))


@register
@dataclass
class SparQ(Method):
    name = "sparq"

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        s = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
        topk = self.budget // 2
        return {"channels": min(head_dim, max(1, round(head_dim * self.budget / s))), "topk": topk,
                "dense": covers_sequence(topk, prompt_len, max_new_tokens)}

    def decode(self, layer, q, upto, plan, scaling):
        b, hkv, g, d = q.shape
        channels = q.abs().topk(plan["channels"], dim=-1, sorted=False).indices  # [B,Hkv,g,r], per head
        q_on_channels = torch.zeros_like(q, dtype=torch.float32).scatter_(-1, channels, q.float().gather(-1, channels))
        logits = torch.einsum("bhgd,bhsd->bhgs", q_on_channels, layer.keys.float())
        vis = visible_mask(layer, upto)
        logits = logits.div_(sparq_temperature(q, channels)[..., None]).masked_fill_(~vis, float("-inf"))
        approx = torch.softmax(logits, dim=-1)
        idx = topk_slots(logits, plan["topk"])  # [B,Hkv,g,k]: softmax keeps the order, and -inf marks hidden slots
        y_k = attend_indices(layer, q, idx, scaling, self.kernels).float()
        chosen = idx >= 0
        alpha = approx.gather(-1, idx.clamp(min=0)).masked_fill(~chosen, 0).sum(-1, keepdim=True)
        if layer.visible is None:  # every head sees the same slots: one mean per KV head
            n_visible = upto.float()
            mean_v = torch.einsum("s,bhsd->bhd", vis[0].float(), layer.values.float())[:, :, None] / n_visible
        else:
            n_visible = vis.sum(-1, keepdim=True)
            mean_v = torch.einsum("bhgs,bhsd->bhgd", vis.float(), layer.values.float()) / n_visible
        # a head that chose every visible token attends exactly: no reallocation
        alpha = alpha.masked_fill(chosen.sum(-1, keepdim=True) >= n_visible, 1.0)
        out = alpha * y_k + (1 - alpha) * mean_v
        union_channels = union_count(channels, d).float().sum().double() / b
        union_tokens = union_count(idx, layer.capacity).float().sum().double() / b
        elements = union_channels * upto.double() + union_tokens * 2 * d + hkv * d
        return out.to(q.dtype), StepCost(mean_count(chosen.sum(-1)), elements)
