"""Vectorised PyTorch implementations of the decode-time kernels.

These are the reference the Triton kernels are tested against and also the
production path on CPU. Queries use the grouped layout [B, Hkv, g, d] so the
g query heads that share a KV head are handled by one batched matmul and K/V
are never repeated per query head.
"""

from __future__ import annotations

import functools
import math

import torch


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


@functools.lru_cache(maxsize=64)
def _unit_starts(units: int, page_size: int, device: torch.device) -> torch.Tensor:
    """The first slot of each of ``units`` units of ``page_size`` slots (with 1: the offsets ``0..units-1``)."""
    return torch.arange(units, device=device) * page_size


def _live_cap(units: int, page_size: int, upto: torch.Tensor, device) -> torch.Tensor:
    """``[U]`` float32: +inf for the units holding slots below ``upto``, -inf past them.  ``minimum`` with it masks a
    row exactly (-0.0 and all) at a sixth of ``masked_fill``'s cost on CPU."""
    return torch.where(_unit_starts(units, page_size, device) >= upto, float("-inf"), float("inf"))


def ordered_keys(scores: torch.Tensor, units: torch.Tensor | None = None, last: int | None = None) -> torch.Tensor:
    """Distinct int64 keys in the order (score desc, index asc) along the last axis: the float32 score's
    order-preserving int32 bits above, the index reversed below (``topk`` on them keeps the tie rule).  ``units``
    (int64, broadcast to ``scores``) are the indices when they are not the positions, all at most ``last``."""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits).long().bitwise_left_shift_(32)
    if units is None:
        return ordered.bitwise_or_(_descending(scores.shape[-1], scores.device))
    return ordered.bitwise_or_(last - units)


PRUNE_FROM = 4096  # a CPU ``topk`` over fewer units costs less than the pruning's extra steps


def _prune_block(units: int, m: int) -> int:
    """Units per block for ``_top_units``'s pruning (1: none), from ``PRUNE_FROM`` units: near ``sqrt(U / m)``, which
    balances ranking the blocks against searching the m best blocks' units, preferring a block that divides the row
    (no padding copy); never so wide that fewer than m blocks remain."""
    target = math.sqrt(units / m)
    widest = min(64, units // m)
    if units < PRUNE_FROM or widest < 4 or target < 3:
        return 1
    near = range(max(4, int(0.7 * target)), min(widest, max(4, int(1.5 * target))) + 1)
    dividing = [block for block in near if units % block == 0]
    return min(dividing, key=lambda block: abs(block - target)) if dividing else min(widest, max(4, round(target)))


def _top_units(scores: torch.Tensor, m: int, ranked: bool = True) -> torch.Tensor:
    """The ``m`` best units of each row of ``scores`` ``[..., U]`` by (score desc, unit asc), in that order (with
    ``ranked``; else in any order).

    Long rows are pruned first (a CPU ``topk`` over thousands of units costs most of a decode step): the units are
    cut into blocks, ranked by (block max desc, block asc), which is the order of each block's best unit, and only
    the ``m`` best blocks are searched; a unit among the m best lies in one of them (each of m blocks ranked above
    its own would hold a better unit).  Padding units (index >= U) score -inf and rank after every real unit."""
    units = scores.shape[-1]
    block = _prune_block(units, m)
    if block == 1:
        return ordered_keys(scores).topk(m, dim=-1, sorted=ranked).indices
    blocks = -(-units // block)
    padded = torch.nn.functional.pad(scores, (0, blocks * block - units), value=float("-inf")) \
        if blocks * block > units else scores.contiguous()
    grouped = padded.view(*scores.shape[:-1], blocks, block)
    maxima = torch.nn.functional.max_pool1d(padded.view(-1, 1, blocks * block), block).view(grouped.shape[:-1])
    best = ordered_keys(maxima).topk(m, dim=-1, sorted=False).indices.unsqueeze(-1)  # [..., m, 1] block ids
    candidates = grouped.gather(-2, best.expand(*best.shape[:-1], block)).flatten(-2)
    ids = (best * block + _unit_starts(block, 1, scores.device)).flatten(-2)
    last = blocks * block - 1
    return ids.gather(-1, ordered_keys(candidates, ids, last).topk(m, dim=-1, sorted=ranked).indices)


def select_units(scores: torch.Tensor, upto: torch.Tensor, page_size: int, budget: int, width: int,
                 split: bool, mass: bool = False, masked: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The best units (pages of ``page_size`` slots, or slots) of each row of ``scores`` ``[..., U]``, ranked by
    (score desc, unit asc) among the units holding slots below ``upto``: with ``split`` until ``budget`` slots
    (the unit at the cut gives its lowest slots), else ``budget`` whole units.  Returns their slots below ``upto``,
    ascending, -1 after them (``[..., width]``), how many per row, and with ``mass`` (slot units) the chosen slots'
    share of the softmax of the scores over the live slots (exactly 1 when every live slot is chosen).  ``masked``
    says the units past ``upto`` already score no more than any live unit (-inf; or 0 under scores >= 0, without
    ``mass``): they rank after every live unit anyway (ties go to the lower unit), so they are not masked again."""
    units = scores.shape[-1]
    m = min(units, -(-budget // page_size) + 1 if split else budget)
    # units past upto score -inf: they rank after every live unit (ties go to the lower unit) and are dropped below
    live_scores = scores.float() if masked else torch.minimum(scores.float(), _live_cap(units, page_size, upto,
                                                                                         scores.device))
    top = _top_units(live_scores, m, ranked=split)  # [..., m], in rank order where the budget counts slots
    if page_size == 1 and not split:  # slot units: each ranked live unit is one chosen slot
        chosen = top.masked_fill(top >= upto, _PAST)
        count = (top < upto).sum(-1)
    else:  # the slots of the ranked units in rank order, each unit's ascending; with split the first budget live
        slot = (top.unsqueeze(-1) * page_size + _unit_starts(page_size, 1, scores.device)).flatten(-2)
        take = slot < upto
        if split:
            take &= take.cumsum(-1) <= budget
        chosen = torch.where(take, slot, _PAST)
        count = take.sum(-1)
    chosen = chosen.sort(dim=-1).values[..., :width]
    if chosen.shape[-1] < width:
        chosen = torch.nn.functional.pad(chosen, (0, width - chosen.shape[-1]), value=_PAST)
    chosen.masked_fill_(chosen == _PAST, -1)
    if not mass:
        return chosen, count, None
    probs = torch.softmax(live_scores, dim=-1).gather(-1, chosen.clamp(min=0)).masked_fill_(chosen < 0, 0.0)
    return chosen, count, torch.where(count >= upto, 1.0, probs.sum(-1))


def _live_slots(upto: torch.Tensor, pages: int, page_size: int, device) -> torch.Tensor:
    return (upto - _unit_starts(pages, page_size, device)).clamp(0, page_size)


def hsa_page_probs(q, page_min_t, page_max_t, upto, page_size: int, channels: int) -> torch.Tensor:
    """HSA's slot probabilities in page space ``[B, Hkv, P]``: per head the softmax over live slots of the page
    scores on the group's top-``channels`` |q| channels (max key where the group's summed q is positive, else min)
    over SparQ's temperature, averaged over the group's heads; every slot of a page shares its page's value.

    The channels are a 0/1 mask over d, so the page scores are two products with the whole tables (on CPU cheaper
    than gathering r rows of each) and a page's live slots enter the softmax as ``log(slots)``."""
    b, hkv, g, d = q.shape
    pages = page_max_t.shape[-1]
    qf = q.float()
    abs_q = qf.abs()
    top = abs_q.sum(2, keepdim=True).topk(channels, dim=-1, sorted=False).indices  # [B,Hkv,1,r]
    picked = torch.zeros(b, hkv, 1, d, device=q.device).scatter_(-1, top, 1.0)
    tau2 = (abs_q @ picked.mT) * d / abs_q.sum(-1, keepdim=True).clamp_min(1e-30)  # [B,Hkv,g,1]
    w = qf * torch.where(tau2 > 0, tau2.rsqrt(), 1.0) * picked  # a zero query: uniform scores, not 0/0
    w_max = w * (qf.sum(2, keepdim=True) > 0)  # the channels scored with the page max
    z = (w - w_max) @ page_min_t.float() + w_max @ page_max_t.float()
    slots = _live_slots(upto, pages, page_size, q.device)
    return torch.softmax(z + slots.log(), dim=-1).mean(2) / slots.clamp_min(1)


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
    ``[B, Hkv, g, r]`` only those channels, times SparQ's 1/tau.  A non-fp32 cache is up-cast a chunk at a time.

    ``keys`` may be a channel-major copy seen as ``[B, Hkv, C, d]`` (``keys_t.mT``, SparQ's): with ``channels`` the
    product then reads only those r rows of each head.  On row-major K the query is zero off the channels instead: a
    product with all of K costs less on CPU than gathering r strided channels of it, and the zeros add nothing."""
    qf = q.float()
    if channels is not None:
        picked = qf.gather(-1, channels)
        inv_tau = (qf.abs().sum(-1, keepdim=True)
                   / (q.shape[-1] * picked.abs().sum(-1, keepdim=True).clamp_min(1e-30))).sqrt()
        if keys.stride(-2) == 1:
            return _channel_rows_scores(picked * inv_tau, keys.mT, channels).clamp_(
                max=_live_cap(keys.shape[2], 1, upto, q.device))
        qf = torch.zeros_like(qf).scatter_(-1, channels, picked * inv_tau)
    if keys.dtype == torch.float32:
        out = qf @ keys.mT
    else:
        out = torch.cat([qf @ keys[:, :, s:s + chunk].float().mT for s in range(0, keys.shape[2], chunk)], dim=-1)
    return out.clamp_(max=_live_cap(keys.shape[2], 1, upto, q.device))


def _channel_rows_scores(q_picked: torch.Tensor, keys_t: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``Σ_j q_picked[..., j] · keys_t[b, h, channels[..., j], :]``: ``[B, Hkv, g, C]`` fp32 from the r rows of
    channel-major K ``[B, Hkv, d, C]`` each head picked."""
    b, hkv, g, r = channels.shape
    d, cap = keys_t.shape[-2:]
    first_row = torch.arange(b * hkv, device=channels.device).view(b, hkv, 1, 1) * d
    rows = keys_t.reshape(b * hkv * d, cap).index_select(0, (first_row + channels).view(-1))
    return (q_picked.unsqueeze(-2) @ rows.view(b, hkv, g, r, cap).float()).squeeze(-2)


def _distinct(idx: torch.Tensor, n: int) -> torch.Tensor:
    b, h = idx.shape[:2]
    hit = torch.zeros(b, h, n + 1, dtype=torch.bool, device=idx.device)
    return hit.scatter_(-1, idx.reshape(b, h, -1) + 1, True)[..., 1:].sum(-1)  # -1 pads land in column 0, dropped


def union_reads(idx, upto, token_weight: int, channels=None, n_slots: int = 0, n_channels: int = 0) -> torch.Tensor:
    """Per (row, KV head) ``[B, Hkv]``: distinct valid slots of ``idx`` ``[B,Hkv,g,k]`` (-1 pads, below
    ``n_slots``) times ``token_weight``, plus with ``channels`` their distinct channels times ``upto``."""
    reads = _distinct(idx, n_slots) * token_weight
    return reads if channels is None else reads + _distinct(channels, n_channels) * upto
