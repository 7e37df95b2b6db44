"""Vectorised PyTorch implementations of the decode-time kernels.

These are the reference the Triton kernels are tested against and also the
production path on CPU. Queries use the grouped layout [B, Hkv, g, d] so the
g query heads that share a KV head are handled by one batched matmul and K/V
are never repeated per query head.
"""

from __future__ import annotations

import functools

import torch

from rocketkv.core.cache import gather_slots


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


# ---------------------------------------------------------------- selection (the Triton selection kernels' oracle)
_PAST = 2 ** 62  # sorts after every slot


@functools.lru_cache(maxsize=64)
def _descending(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n - 1, -1, -1, device=device)


def ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """Distinct int64 keys in the order (score desc, index asc) along the last axis: the float32 score's
    order-preserving int32 bits above, the index reversed below (``topk`` on them keeps the tie rule)."""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.long() << 32) | _descending(scores.shape[-1], scores.device)


def select_units(scores: torch.Tensor, upto: torch.Tensor, page_size: int, budget: int, width: int,
                 split: bool, mass: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The best units (pages of ``page_size`` slots, or slots) of each row of ``scores`` ``[..., U]``, ranked by
    (score desc, unit asc) among the units holding slots below ``upto``: with ``split`` until ``budget`` slots
    (the unit at the cut gives its lowest slots), else ``budget`` whole units.  Returns their slots below ``upto``,
    ascending, -1 after them (``[..., width]``), how many per row, and with ``mass`` (slot units) the chosen slots'
    share of the softmax of the scores over the live slots (exactly 1 when every live slot is chosen)."""
    units = scores.shape[-1]
    m = min(units, -(-budget // page_size) + 1 if split else budget)
    dead = torch.arange(units, device=scores.device) * page_size >= upto  # units past upto never count
    top = ordered_keys(scores).masked_fill_(dead, torch.iinfo(torch.long).min).topk(m, dim=-1).indices
    slots = (upto - top * page_size).clamp(0, page_size)  # live slots of each ranked unit (0 once past upto)
    take = (budget - (slots.cumsum(-1) - slots)).clamp(min=0).minimum(slots) if split else slots
    t = torch.arange(page_size, device=scores.device)
    chosen = torch.where(t < take[..., None], top[..., None] * page_size + t, _PAST).flatten(-2)
    chosen = chosen.sort(dim=-1).values[..., :width]
    if chosen.shape[-1] < width:
        chosen = torch.nn.functional.pad(chosen, (0, width - chosen.shape[-1]), value=_PAST)
    chosen.masked_fill_(chosen == _PAST, -1)
    count = take.sum(-1)
    if not mass:
        return chosen, count, None
    probs = torch.softmax(scores.float(), dim=-1).gather(-1, chosen.clamp(min=0)).masked_fill_(chosen < 0, 0.0)
    return chosen, count, torch.where(count >= upto, 1.0, probs.sum(-1))


def _live_slots(upto: torch.Tensor, pages: int, page_size: int, device) -> torch.Tensor:
    return (upto - torch.arange(pages, device=device) * page_size).clamp(0, page_size)


def hsa_page_probs(q, page_min_t, page_max_t, upto, page_size: int, channels: int) -> torch.Tensor:
    """HSA's slot probabilities in page space ``[B, Hkv, P]``: per head the softmax over live slots of the page
    scores on the group's top-``channels`` |q| channels (max key where the group's summed q is positive, else min)
    over SparQ's temperature, averaged over the group's heads; every slot of a page shares its page's value."""
    b, hkv, g, d = q.shape
    pages = page_max_t.shape[-1]
    qf = q.float()
    abs_q = qf.abs()
    ch = abs_q.sum(2).topk(channels, dim=-1, sorted=False).indices  # [B,Hkv,r]
    use_max = qf.sum(2).gather(-1, ch) > 0
    q_sel = qf.gather(-1, ch[:, :, None].expand(b, hkv, g, channels))
    tau = (d * q_sel.abs().sum(-1) / abs_q.sum(-1).clamp_min(1e-30)).sqrt()
    tau = torch.where(tau > 0, tau, 1.0)  # a zero query: uniform scores (the lowest slots at the cut), not 0/0
    rows = torch.where(use_max[..., None], gather_slots(page_max_t, ch), gather_slots(page_min_t, ch)).float()
    slots = _live_slots(upto, pages, page_size, q.device)
    z = (q_sel @ rows * (1.0 / tau)[..., None]).masked_fill_(slots == 0, float("-inf"))
    e = (z - z.amax(-1, keepdim=True)).exp_()
    return (e * (1.0 / (e * slots).sum(-1, keepdim=True))).sum(2) / g


def quest_group_scores(q, page_min_t, page_max_t, upto, page_size: int) -> torch.Tensor:
    """Quest's page upper bounds summed over the group's heads ``[B, Hkv, P]``; pages past ``upto`` -inf.  With
    min <= max, ``max(q·lo, q·hi)`` is ``q⁺·hi + q⁻·lo`` per channel, so the heads' sum is two products."""
    qf = q.float()
    bounds = (qf.clamp(min=0).sum(2, keepdim=True) @ page_max_t.float()
              + qf.clamp(max=0).sum(2, keepdim=True) @ page_min_t.float()).squeeze(2)
    dead = _live_slots(upto, page_max_t.shape[-1], page_size, q.device) == 0
    return bounds.masked_fill_(dead, float("-inf"))


def scores(q, keys, upto, channels=None, chunk: int = 4096) -> torch.Tensor:
    """``q·k`` per head over the buffer's slots ``[B, Hkv, g, C]`` in fp32, -inf from ``upto`` on; with ``channels``
    ``[B, Hkv, g, r]`` only those channels, times SparQ's 1/tau.  A non-fp32 cache is up-cast a chunk at a time."""
    qf = q.float()
    if channels is not None:  # only those channels of K are read: gathered per head, then up-cast
        b, hkv, g, r = channels.shape
        picked = qf.gather(-1, channels)
        inv_tau = (qf.abs().sum(-1) / (q.shape[-1] * picked.abs().sum(-1).clamp_min(1e-30))).sqrt()
        cap = keys.shape[2]
        k_sel = keys.unsqueeze(2).expand(b, hkv, g, cap, keys.shape[-1]).gather(
            -1, channels.unsqueeze(3).expand(b, hkv, g, cap, r)).float()  # [B,Hkv,g,C,r]
        out = torch.einsum("bhgr,bhgcr->bhgc", picked * inv_tau[..., None], k_sel)
    elif keys.dtype == torch.float32:
        out = qf @ keys.mT
    else:
        out = torch.cat([qf @ keys[:, :, s:s + chunk].float().mT for s in range(0, keys.shape[2], chunk)], dim=-1)
    return out.masked_fill_(torch.arange(keys.shape[2], device=q.device) >= upto, float("-inf"))


def _distinct(idx: torch.Tensor, n: int) -> torch.Tensor:
    b, h = idx.shape[:2]
    hit = torch.zeros(b, h, n + 1, dtype=torch.bool, device=idx.device)
    return hit.scatter_(-1, idx.reshape(b, h, -1) + 1, True)[..., 1:].sum(-1)  # -1 pads land in column 0, dropped


def union_reads(idx, upto, token_weight: int, channels=None, n_slots: int = 0, n_channels: int = 0) -> torch.Tensor:
    """Per (row, KV head) ``[B, Hkv]``: distinct valid slots of ``idx`` ``[B,Hkv,g,k]`` (-1 pads, below
    ``n_slots``) times ``token_weight``, plus with ``channels`` their distinct channels times ``upto``."""
    reads = _distinct(idx, n_slots) * token_weight
    return reads if channels is None else reads + _distinct(channels, n_channels) * upto
