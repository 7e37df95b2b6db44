"""Triton kernels of the page-table methods' decode step (Quest, HSA / RocketKV's stage 2).

Each reads the step's slot count ``upto`` (a 0-dim int64 device tensor) itself, so a step launches a fixed
sequence of kernels and reads nothing back to the host.  One program serves one KV head of one row (its g query
heads together).  The torch reference in ``reference.py`` computes the same, op for op where the order matters.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 64


@triton.jit
def _fold_kernel(k_ptr, min_ptr, max_ptr, upto_ptr, num_kv_heads, head_dim, page_size,
                 k_sb, k_sh, k_ss, k_sd, t_sb, t_sh, t_sd, t_sp, D_PAD: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    slot = tl.load(upto_ptr) - 1
    page = slot // page_size
    opens = slot % page_size == 0
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    key = tl.load(k_ptr + b * k_sb + h * k_sh + slot * k_ss + offs_d * k_sd, mask=d_mask, other=0.0)
    rows = b * t_sb + h * t_sh + offs_d * t_sd + page * t_sp
    low = tl.load(min_ptr + rows, mask=d_mask, other=0.0)
    high = tl.load(max_ptr + rows, mask=d_mask, other=0.0)
    low = tl.where(opens, key, tl.minimum(low, key.to(low.dtype)))
    high = tl.where(opens, key, tl.maximum(high, key.to(high.dtype)))
    tl.store(min_ptr + rows, low.to(min_ptr.dtype.element_ty), mask=d_mask)
    tl.store(max_ptr + rows, high.to(max_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _page_logits(q_sel, inv_tau, ch, use_max, r_mask, min_base, max_base, t_sd, t_sp, offs_p, live):
    """[G, BLOCK_P] logits / tau of pages ``offs_p`` on the selected channels (masked rows load nothing)."""
    tile = r_mask[:, None] & live[None, :]
    rows_max = tl.load(max_base + ch[:, None] * t_sd + offs_p[None, :] * t_sp, mask=tile & use_max[:, None],
                       other=0.0)
    rows_min = tl.load(min_base + ch[:, None] * t_sd + offs_p[None, :] * t_sp, mask=tile & ~use_max[:, None],
                       other=0.0)
    rows = tl.where(use_max[:, None], rows_max, rows_min).to(tl.float32)
    logits = tl.sum(q_sel[:, :, None] * rows[None, :, :], axis=1)
    return tl.where(live[None, :], logits * inv_tau[:, None], float("-inf"))


@triton.jit
def _hsa_page_probs_kernel(q_ptr, min_ptr, max_ptr, upto_ptr, out_ptr,
                           num_kv_heads, group, head_dim, num_channels, page_size,
                           q_sb, q_sh, q_sg, q_sd, t_sb, t_sh, t_sd, t_sp, o_sb, o_sh, o_sp,
                           G_PAD: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    upto = tl.load(upto_ptr)
    n_pages = (upto + page_size - 1) // page_size
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    q_base = q_ptr + b * q_sb + h * q_sh
    q = tl.load(q_base + offs_g[:, None] * q_sg + offs_d[None, :] * q_sd, mask=g_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    abs_q = tl.abs(q)
    weight = tl.sum(abs_q, axis=0)  # the group's |q| per channel
    # rank of each channel by weight (ties: the lower channel first); the top num_channels are chosen
    ahead = (weight[None, :] > weight[:, None]) | ((weight[None, :] == weight[:, None])
                                                  & (offs_d[None, :] < offs_d[:, None]))
    rank = tl.sum((ahead & d_mask[None, :]).to(tl.int32), axis=1)
    chosen = (rank < num_channels) & d_mask
    tau = tl.sqrt(head_dim * tl.sum(tl.where(chosen[None, :], abs_q, 0.0), axis=1)
                  / tl.maximum(tl.sum(abs_q, axis=1), 1e-30))
    # padded heads, and a zero query (uniform scores, as the torch path), divide by 1 instead of 0
    inv_tau = tl.where(g_mask, 1.0 / tl.where(g_mask & (tau > 0), tau, 1.0), 0.0)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < num_channels
    at = (rank[None, :] == offs_r[:, None]) & chosen[None, :]  # [R, D]: row i holds the channel of rank i
    ch = tl.sum(tl.where(at, offs_d[None, :], 0), axis=1)
    group_sum = tl.sum(q, axis=0)
    use_max = tl.sum(tl.where(at & (group_sum[None, :] > 0), 1, 0), axis=1) > 0
    q_sel = tl.load(q_base + offs_g[:, None] * q_sg + ch[None, :] * q_sd, mask=g_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)
    min_base = min_ptr + b * t_sb + h * t_sh
    max_base = max_ptr + b * t_sb + h * t_sh

    # per head: max, then the softmax normaliser over slots (each page counts its live slots), then the mean
    # over the group's heads of each page's probability
    top = tl.full((G_PAD,), float("-inf"), tl.float32)
    for start in range(0, n_pages, BLOCK):
        offs_p = start + tl.arange(0, BLOCK)
        z = _page_logits(q_sel, inv_tau, ch, use_max, r_mask, min_base, max_base, t_sd, t_sp, offs_p,
                         offs_p < n_pages)
        top = tl.maximum(top, tl.max(z, axis=1))
    total = tl.zeros((G_PAD,), tl.float32)
    for start in range(0, n_pages, BLOCK):
        offs_p = start + tl.arange(0, BLOCK)
        live = offs_p < n_pages
        z = _page_logits(q_sel, inv_tau, ch, use_max, r_mask, min_base, max_base, t_sd, t_sp, offs_p, live)
        slots = tl.minimum(tl.maximum(upto - offs_p * page_size, 0), page_size).to(tl.float32)
        total += tl.sum(tl.exp(z - top[:, None]) * slots[None, :], axis=1)
    inv_total = tl.where(g_mask, 1.0 / tl.where(g_mask, total, 1.0), 0.0)
    for start in range(0, n_pages, BLOCK):
        offs_p = start + tl.arange(0, BLOCK)
        live = offs_p < n_pages
        z = _page_logits(q_sel, inv_tau, ch, use_max, r_mask, min_base, max_base, t_sd, t_sp, offs_p, live)
        prob = tl.sum(tl.exp(z - top[:, None]) * inv_total[:, None], axis=0) / group
        tl.store(out_ptr + b * o_sb + h * o_sh + offs_p * o_sp, prob, mask=live)


@triton.jit
def _quest_group_scores_kernel(q_ptr, min_ptr, max_ptr, upto_ptr, out_ptr,
                               num_kv_heads, group, head_dim, page_size, num_pages,
                               q_sb, q_sh, q_sg, q_sd, t_sb, t_sh, t_sd, t_sp, o_sb, o_sh, o_sp,
                               G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    n_pages = (tl.load(upto_ptr) + page_size - 1) // page_size
    offs_g = tl.arange(0, G_PAD)
    offs_p = pid_p * BLOCK + tl.arange(0, BLOCK)
    live = offs_p < n_pages
    g_mask = offs_g < group
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for d_start in range(0, head_dim, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        tile = (offs_d < head_dim)[:, None] & live[None, :]
        rows = b * t_sb + h * t_sh + offs_d[:, None] * t_sd + offs_p[None, :] * t_sp
        low = tl.load(min_ptr + rows, mask=tile, other=0.0).to(tl.float32)
        high = tl.load(max_ptr + rows, mask=tile, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + b * q_sb + h * q_sh + offs_g[:, None] * q_sg + offs_d[None, :] * q_sd,
                    mask=g_mask[:, None] & (offs_d < head_dim)[None, :], other=0.0).to(tl.float32)
        # min <= max: max(q·lo, q·hi) = q⁺·hi + q⁻·lo, so the heads' sum needs the group's q⁺ and q⁻ only
        q_pos = tl.sum(tl.maximum(q, 0.0), axis=0)
        q_neg = tl.sum(tl.minimum(q, 0.0), axis=0)
        acc += tl.sum(q_pos[:, None] * high + q_neg[:, None] * low, axis=0)
    score = tl.where(live, acc, float("-inf"))
    tl.store(out_ptr + b * o_sb + h * o_sh + offs_p * o_sp, score, mask=offs_p < num_pages)


def fold_page_bounds(keys, page_min_t, page_max_t, upto, page_size):
    batch, kv_heads, _, head_dim = keys.shape
    _fold_kernel[(batch * kv_heads,)](
        keys, page_min_t, page_max_t, upto, kv_heads, head_dim, page_size,
        *keys.stride(), *page_min_t.stride(), D_PAD=triton.next_power_of_2(head_dim))


def hsa_page_probs(q, page_min_t, page_max_t, upto, page_size, channels):
    batch, kv_heads, group, head_dim = q.shape
    out = torch.empty(batch, kv_heads, page_max_t.shape[-1], dtype=torch.float32, device=q.device)  # live pages set
    assert page_min_t.stride() == page_max_t.stride()
    g_pad, r_pad = triton.next_power_of_2(group), triton.next_power_of_2(channels)
    block = max(16, min(BLOCK_P, 8192 // (g_pad * r_pad)))
    _hsa_page_probs_kernel[(batch * kv_heads,)](
        q, page_min_t, page_max_t, upto, out, kv_heads, group, head_dim, channels, page_size,
        *q.stride(), *page_min_t.stride(), *out.stride(),
        G_PAD=g_pad, D_PAD=triton.next_power_of_2(head_dim), R_PAD=r_pad, BLOCK=block)
    return out


def quest_group_scores(q, page_min_t, page_max_t, upto, page_size):
    batch, kv_heads, group, head_dim = q.shape
    pages = page_max_t.shape[-1]
    out = torch.empty(batch, kv_heads, pages, dtype=torch.float32, device=q.device)
    assert page_min_t.stride() == page_max_t.stride()
    _quest_group_scores_kernel[(batch * kv_heads, triton.cdiv(pages, BLOCK_P))](
        q, page_min_t, page_max_t, upto, out, kv_heads, group, head_dim, page_size, pages,
        *q.stride(), *page_min_t.stride(), *out.stride(),
        G_PAD=triton.next_power_of_2(group), BLOCK_D=16, BLOCK=BLOCK_P)
    return out
