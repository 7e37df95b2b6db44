"""Triton kernels of the sparse methods' selection: exact top-k over units (pages or slots) and query-key scores.

``select`` keeps today's rule (``reference.select_units``): units ranked by (score desc, unit asc); the budget
counts slots (the unit at the cut gives its lowest slots) or whole units.  It finds the cut by a bisection over the
scores' order-preserving int32 keys, then writes the chosen units' slots ascending, -1 after them.  One program
per row; the step's slot count ``upto`` is read on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256
BLOCK_S = 64


@triton.jit
def _units(score_ptr, row, s_sp, upto, page_size, offs, n_units):
    """Order-preserving int32 keys of the units ``offs``, their live slots, and which are live."""
    live = offs < n_units
    bits = tl.load(score_ptr + row + offs * s_sp, mask=live, other=0.0).to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    slots = tl.minimum(tl.maximum(upto - offs * page_size, 0), page_size)
    return key, slots, live


@triton.jit
def _select_kernel(score_ptr, upto_ptr, out_ptr, count_ptr, mass_ptr, rows_per_batch, page_size, budget, width,
                   s_sb, s_sr, s_sp, o_sb, o_sr, o_sk,
                   SPLIT: tl.constexpr, MASS: tl.constexpr, PAGE_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // rows_per_batch).to(tl.int64)
    r = (pid % rows_per_batch).to(tl.int64)
    upto = tl.load(upto_ptr)
    n_units = (upto + page_size - 1) // page_size
    row = b * s_sb + r * s_sr
    zero = upto * 0
    # the cut: the largest key whose units at or above it hold at least ``budget`` (slots or units)
    lo = zero - 2147483648
    hi = zero + 2147483648
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        count = zero
        for start in range(0, n_units, BLOCK):
            key, slots, live = _units(score_ptr, row, s_sp, upto, page_size, start + tl.arange(0, BLOCK), n_units)
            weight = slots if SPLIT else live.to(tl.int64)
            count += tl.sum(tl.where(live & (key >= mid), weight, 0))
        enough = count >= budget
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = zero
    for start in range(0, n_units, BLOCK):
        key, slots, live = _units(score_ptr, row, s_sp, upto, page_size, start + tl.arange(0, BLOCK), n_units)
        weight = slots if SPLIT else live.to(tl.int64)
        above += tl.sum(tl.where(live & (key > lo), weight, 0))
    need = budget - above  # taken from the units tied at the cut, lowest first
    if MASS:  # the softmax of the scores over the live slots (slot units): its max and normaliser
        top = tl.full((), float("-inf"), tl.float32)
        for start in range(0, n_units, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            top = tl.maximum(top, tl.max(tl.load(score_ptr + row + offs * s_sp, mask=offs < n_units,
                                                 other=float("-inf"))))
        total = tl.zeros((), tl.float32)
        for start in range(0, n_units, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total += tl.sum(tl.exp(tl.load(score_ptr + row + offs * s_sp, mask=offs < n_units,
                                           other=float("-inf")) - top))
    picked = tl.zeros((), tl.float32)
    written = zero
    tied_seen = zero
    t = tl.arange(0, PAGE_PAD)
    out_row = out_ptr + b * o_sb + r * o_sr
    for start in range(0, n_units, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key, slots, live = _units(score_ptr, row, s_sp, upto, page_size, offs, n_units)
        tied = live & (key == lo)
        tied_weight = tl.where(tied, slots if SPLIT else 1, 0).to(tl.int64)
        before = tied_seen + tl.cumsum(tied_weight, 0) - tied_weight
        if SPLIT:
            take = tl.where(tied, tl.minimum(tl.maximum(need - before, 0), slots), 0)
        else:
            take = tl.where(tied & (before < need), slots, 0)
        take = tl.where(live & (key > lo), slots, take)
        at = written + tl.cumsum(take, 0) - take
        tl.store(out_row + (at[:, None] + t[None, :]) * o_sk, offs[:, None] * page_size + t[None, :],
                 mask=t[None, :] < take[:, None])
        written += tl.sum(take)
        tied_seen += tl.sum(tied_weight)
        if MASS:
            prob = tl.exp(tl.load(score_ptr + row + offs * s_sp, mask=live, other=float("-inf")) - top)
            picked += tl.sum(tl.where(take > 0, prob, 0.0))
    for start in range(0, width, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        tl.store(out_row + pos * o_sk, tl.full((BLOCK,), -1, tl.int64), mask=(pos >= written) & (pos < width))
    tl.store(count_ptr + pid, written)
    if MASS:  # every live slot chosen: exactly 1
        tl.store(mass_ptr + pid, tl.where(written >= upto, 1.0, picked / total))


@triton.jit
def _scores_kernel(q_ptr, k_ptr, ch_ptr, upto_ptr, out_ptr, num_kv_heads, group, head_dim, num_channels, capacity,
                   q_sb, q_sh, q_sg, q_sd, k_sb, k_sh, k_ss, k_sd, c_sb, c_sh, c_sg, c_sr, o_sb, o_sh, o_sg, o_ss,
                   G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr, CHANNELS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    upto = tl.load(upto_ptr)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_g = tl.arange(0, G_PAD)
    g_mask = offs_g < group
    live = offs_s < upto
    q_base = q_ptr + b * q_sb + h * q_sh + offs_g * q_sg
    k_base = k_ptr + b * k_sb + h * k_sh + offs_s * k_ss
    if CHANNELS:  # SparQ: each head's own channels, scaled by 1/tau = sqrt(|q| / (d |q_I|)) of that head
        acc = tl.zeros((G_PAD, BLOCK_S), tl.float32)
        picked = tl.zeros((G_PAD,), tl.float32)
        for i in range(num_channels):
            c = tl.load(ch_ptr + b * c_sb + h * c_sh + offs_g * c_sg + i * c_sr, mask=g_mask, other=0)
            q_c = tl.load(q_base + c * q_sd, mask=g_mask, other=0.0).to(tl.float32)
            k_c = tl.load(k_base[None, :] + c[:, None] * k_sd, mask=g_mask[:, None] & live[None, :], other=0.0)
            acc += q_c[:, None] * k_c.to(tl.float32)
            picked += tl.abs(q_c)
        offs_d = tl.arange(0, D_PAD)
        q = tl.load(q_base[:, None] + offs_d[None, :] * q_sd, mask=g_mask[:, None] & (offs_d < head_dim)[None, :],
                    other=0.0).to(tl.float32)
        acc = acc * tl.sqrt(tl.sum(tl.abs(q), axis=1) / (head_dim * tl.maximum(picked, 1e-30)))[:, None]
    else:  # exact scores on every channel, fp32 accumulation
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < head_dim
        q = tl.load(q_base[:, None] + offs_d[None, :] * q_sd, mask=g_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        keys = tl.load(k_base[:, None] + offs_d[None, :] * k_sd, mask=live[:, None] & d_mask[None, :],
                       other=0.0).to(tl.float32)
        acc = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
    acc = tl.where(live[None, :], acc, float("-inf"))
    tl.store(out_ptr + b * o_sb + h * o_sh + offs_g[:, None] * o_sg + offs_s[None, :] * o_ss, acc,
             mask=g_mask[:, None] & (offs_s < capacity)[None, :])


@triton.jit
def _distinct(ptr, group, width, s_g, s_k, K_PAD: tl.constexpr):
    """Distinct valid (>= 0) entries over the ``group`` rows of ``width`` at ``ptr`` (each row's entries distinct)."""
    offs = tl.arange(0, K_PAD)
    found = 0
    for j in range(group):
        mine = tl.load(ptr + j * s_g + offs * s_k, mask=offs < width, other=-1)
        fresh = mine >= 0
        for i in range(j):
            other = tl.load(ptr + i * s_g + offs * s_k, mask=offs < width, other=-1)
            fresh = fresh & (tl.sum((mine[:, None] == other[None, :]).to(tl.int32), axis=1) == 0)
        found += tl.sum(fresh.to(tl.int32))
    return found


@triton.jit
def _union_reads_kernel(idx_ptr, ch_ptr, upto_ptr, out_ptr, num_kv_heads, group, width, num_channels, token_weight,
                        i_sb, i_sh, i_sg, i_sk, c_sb, c_sh, c_sg, c_sr,
                        K_PAD: tl.constexpr, R_PAD: tl.constexpr, CHANNELS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    reads = _distinct(idx_ptr + b * i_sb + h * i_sh, group, width, i_sg, i_sk, K_PAD).to(tl.int64) * token_weight
    if CHANNELS:
        channels = _distinct(ch_ptr + b * c_sb + h * c_sh, group, num_channels, c_sg, c_sr, R_PAD)
        reads += channels.to(tl.int64) * tl.load(upto_ptr)
    tl.store(out_ptr + pid, reads)


def union_reads(idx, upto, token_weight, channels=None):
    """Per (row, KV head) ``[B, Hkv]`` int64: distinct slots of the g heads' sets ``idx`` [B,Hkv,g,k] times
    ``token_weight``, plus with ``channels`` [B,Hkv,g,r] their distinct channels times ``upto``."""
    batch, kv_heads, group, width = idx.shape
    out = torch.empty(batch, kv_heads, dtype=torch.long, device=idx.device)
    ch = channels if channels is not None else idx
    _union_reads_kernel[(batch * kv_heads,)](
        idx, ch, upto, out, kv_heads, group, width, ch.shape[-1], token_weight, *idx.stride(), *ch.stride(),
        K_PAD=triton.next_power_of_2(width), R_PAD=triton.next_power_of_2(ch.shape[-1]),
        CHANNELS=channels is not None)
    return out


def select(scores, upto, page_size, budget, width, split, mass=False):
    """``scores`` [B, R, U] float32 -> slots [B, R, width] int64 (ascending, -1 after), counts [B, R] int64 and
    with ``mass`` (slot units) the chosen slots' share of the scores' softmax [B, R] (else None)."""
    batch, rows, _ = scores.shape
    out = torch.empty(batch, rows, width, dtype=torch.long, device=scores.device)
    count = torch.empty(batch, rows, dtype=torch.long, device=scores.device)
    shares = torch.empty(batch, rows, dtype=torch.float32, device=scores.device) if mass else None
    page_pad = triton.next_power_of_2(page_size)
    assert not mass or page_size == 1, "the softmax mass is over slot units"
    _select_kernel[(batch * rows,)](
        scores, upto, out, count, count if shares is None else shares, rows, page_size, budget, width,
        *scores.stride(), *out.stride(), SPLIT=split, MASS=mass, PAGE_PAD=page_pad, BLOCK=max(16, BLOCK // page_pad))
    return out, count, shares


def scores(q, keys, upto, channels=None):
    """``q·k`` of every head over the buffer's slots, fp32, -inf from ``upto`` on; with ``channels`` [B,Hkv,g,r]
    only those channels of each head, times SparQ's 1/tau."""
    batch, kv_heads, group, head_dim = q.shape
    capacity = keys.shape[2]
    out = torch.empty(batch, kv_heads, group, capacity, dtype=torch.float32, device=q.device)
    ch = channels if channels is not None else out  # unused without channels
    _scores_kernel[(batch * kv_heads, triton.cdiv(capacity, BLOCK_S))](
        q, keys, ch, upto, out, kv_heads, group, head_dim, 0 if channels is None else channels.shape[-1], capacity,
        *q.stride(), *keys.stride(), *ch.stride(), *out.stride(),
        G_PAD=triton.next_power_of_2(group), D_PAD=triton.next_power_of_2(head_dim), BLOCK_S=BLOCK_S,
        CHANNELS=channels is not None)
    return out
