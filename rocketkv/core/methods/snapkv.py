"""SnapKV: after the prefill keep the prompt tokens the observation window attends to most.

Scores are the post-softmax attention of the last ``w`` prompt queries summed over those queries, max-pooled
(stride 1, same length).  ``selection: head`` is the paper's baseline mapping (each query head keeps ``t/g``
tokens, window included); ``selection: group`` sums the scores over the g heads of a KV group and keeps one
set of ``t`` tokens per KV head (RocketKV's stage 1 without its capacity split).  ``kernel_size: auto`` picks
the kernel from the prompt length by the ``adaptive_kernel_sizes`` table: with ``selection: group`` that is
SnapKV++ (the paper's GQA-aware SnapKV with adaptive pooling).
"""
from dataclasses import dataclass

import torch

from rocketkv.core.methods.base import Method, register
from rocketkv.core.methods.ops import (ADAPTIVE_KERNEL_SIZES, check_pool_kernel, keep_selection, max_pool,
                                       pool_kernel, window_scores)


@register
@dataclass
class SnapKV(Method):
    name = "snapkv"
    kernel_size: int | str = 7
    selection: str = "head"
    adaptive_kernel_sizes: tuple | list = ADAPTIVE_KERNEL_SIZES

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in ("head", "group"):
            raise ValueError(f"snapkv selection={self.selection!r} is not valid; use head or group")
        check_pool_kernel(self.name, self.kernel_size, self.adaptive_kernel_sizes)

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size: int = 1):
        per_set = self.budget // group_size if self.selection == "head" else self.budget
        if per_set < self.window:
            raise ValueError(
                f"budget={self.budget} leaves {per_set} tokens per {'query head' if self.selection == 'head' else 'KV head'}"
                f", below the observation window w={self.window}; use budget >= "
                f"{self.window * (group_size if self.selection == 'head' else 1)} or a smaller window")
        kernel = pool_kernel(self.kernel_size, self.adaptive_kernel_sizes, prompt_len)
        return {"prompt_budget": per_set, "kernel_size": kernel, "dense": prompt_len <= per_set}  # dense: nothing evicted

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        keep = plan["prompt_budget"]
        if prompt_len <= keep:
            return
        scores = window_scores(q_window, layer.keys, prompt_len, self.window, scaling)  # [B,Hkv,g,L-w]
        n_prefix = keep - self.window
        if self.selection == "group":
            chosen = max_pool(scores.sum(dim=2), plan["kernel_size"]).topk(n_prefix, dim=-1, sorted=False).indices
            keep_selection(layer, chosen, prompt_len - self.window)
            return
        per_head = max_pool(scores, plan["kernel_size"]).topk(n_prefix, dim=-1, sorted=False).indices  # [B,Hkv,g,m]
        self._keep_per_head(layer, per_head, prompt_len)

    def _keep_per_head(self, layer, per_head, prompt_len):
        """Store the union of the heads' choices once per KV head; each head sees only its own choice."""
        b, hkv, g, _ = per_head.shape
        prefix_len = prompt_len - self.window
        chosen = torch.zeros(b, hkv, g, prefix_len, dtype=torch.bool, device=per_head.device)
        chosen.scatter_(-1, per_head, True)
        in_union = chosen.any(dim=2)  # [B,Hkv,L-w]
        n_union = int(in_union.sum(-1).max())
        # Slots of the union first (in position order), padding slots after: stable sort on "not in union".
        order = torch.sort((~in_union).to(torch.int8), dim=-1, stable=True).indices[..., :n_union]
        is_real = torch.gather(in_union, -1, order)
        head_vis = torch.gather(chosen, -1, order.unsqueeze(2).expand(b, hkv, g, n_union)) & is_real.unsqueeze(2)
        tail = torch.arange(prefix_len, layer.stored, device=per_head.device)
        slots = torch.cat([order, tail.expand(b, hkv, -1)], dim=-1)
        tail_vis = torch.ones(b, hkv, g, tail.numel(), dtype=torch.bool, device=per_head.device)
        layer.keep(slots, visible=torch.cat([head_vis, tail_vis], dim=-1))
