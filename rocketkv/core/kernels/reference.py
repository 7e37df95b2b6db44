"""Vectorised PyTorch implementations of the decode-time kernels.

These are the reference the Triton kernels are tested against and also the
production path on CPU. Queries use the grouped layout [B, Hkv, g, d] so the
g query heads that share a KV head are handled by one batched matmul and K/V
are never repeated per query head.
"""

from __future__ import annotations

import torch


def rocketkv_page_scores(
    q: torch.Tensor,
    page_min_t: torch.Tensor,
    page_max_t: torch.Tensor,
    channels: torch.Tensor,
    signs: torch.Tensor,
) -> torch.Tensor:
    """Upper-bound page scores from r selected channels -> float32 [B, Hkv, g, P].

    q: [B, Hkv, g, d]; page_min_t / page_max_t: [B, Hkv, d, P];
    channels: [B, Hkv, r] int64; signs: [B, Hkv, r] (+1 picks the max row, else min).
    """
    group = q.shape[2]
    num_pages = page_max_t.shape[-1]
    q_selected = torch.gather(q, 3, channels.unsqueeze(2).expand(-1, -1, group, -1))
    row_index = channels.unsqueeze(-1).expand(-1, -1, -1, num_pages)
    bound_rows = torch.where(
        (signs > 0).unsqueeze(-1),
        torch.gather(page_max_t, 2, row_index),
        torch.gather(page_min_t, 2, row_index),
    )
    return torch.matmul(q_selected.float(), bound_rows.float())


def quest_page_scores(
    q: torch.Tensor, page_min_t: torch.Tensor, page_max_t: torch.Tensor
) -> torch.Tensor:
    """Quest upper bound sum_j max(q_j * min_j, q_j * max_j) -> float32 [B, Hkv, g, P].

    Assumes page_min_t <= page_max_t element-wise (true for min/max metadata),
    which turns the element-wise max into two matmuls: positive query entries
    pair with the max row, negative ones with the min row.
    """
    q32 = q.float()
    return torch.matmul(q32.clamp(min=0), page_max_t.float()) + torch.matmul(
        q32.clamp(max=0), page_min_t.float()
    )


def _softmax_weighted_sum(
    scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(scores) @ values in fp32, masked entries excluded; rows with nothing valid give 0."""
    if scores.shape[-1] == 0:
        return scores.new_zeros(scores.shape[:-1] + values.shape[-1:])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # An all-masked row has max -inf; shifting by 0 instead keeps exp() at 0 rather than NaN.
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    normaliser = weights.sum(dim=-1, keepdim=True)
    weighted = torch.matmul(weights, values)
    return torch.where(normaliser > 0, weighted / normaliser.clamp(min=1e-30), torch.zeros_like(weighted))


def sparse_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention over the selected slots only -> [B, Hkv, g, d] in q's dtype.

    keys / values: [B, Hkv, S, d]; indices: [B, Hkv, k] int64 slot ids shared by
    the group, -1 = padding. A row with no valid index returns zeros.
    """
    head_dim = keys.shape[-1]
    valid = indices >= 0
    gather_index = indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, head_dim)
    selected_keys = torch.gather(keys, 2, gather_index).float()
    selected_values = torch.gather(values, 2, gather_index).float()
    scores = torch.matmul(q.float(), selected_keys.transpose(-1, -2)) * scale
    out = _softmax_weighted_sum(scores, selected_values, valid.unsqueeze(2))
    return out.to(q.dtype)


def dense_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, upto: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention over the slots ``[0, upto)`` (``upto`` a 0-dim tensor, never read on the host) -> [B, Hkv, g, d].

    The g query heads of a group stand in SDPA's query-length axis: one K/V read serves them all."""
    valid = (torch.arange(keys.shape[2], device=keys.device) < upto)[None]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=valid, scale=scale)
