"""Triton sparse decode attention over selected slots, and its launch wrapper.

The kernels take the grouped query layout [B, Hkv, g, d]: one program serves
the g query heads of a KV head, so gathered K/V are read once per group.
Accumulation is fp32. The wrapper accepts CPU tensors too, so the kernels can
be checked with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKEN_BLOCK = 16
# Upper bound on programs per KV head in the split-k decode; more chunks only add combine work.
MAX_CHUNKS_PER_HEAD = 64


@triton.jit
def _sparse_decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,
    num_kv_heads, group, num_selected, chunk_size, num_chunks, scale,
    q_sb, q_sh, q_sg, q_sd,
    k_sb, k_sh, k_ss, k_sd,
    v_sb, v_sh, v_ss, v_sd,
    idx_sb, idx_sh, idx_sk,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    # int64 so batch offsets cannot overflow on large caches.
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < group

    q = tl.load(
        q_ptr + b * q_sb + h * q_sh + offs_g[:, None] * q_sg + offs_d[None, :] * q_sd,
        mask=g_mask[:, None], other=0.0,
    ).to(tl.float32)
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    idx_base = idx_ptr + b * idx_sb + h * idx_sh

    run_max = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)

    chunk_start = pid_chunk * chunk_size
    for tile_start in range(chunk_start, chunk_start + chunk_size, BLOCK_K):
        offs_k = tile_start + tl.arange(0, BLOCK_K)
        slot = tl.load(idx_base + offs_k * idx_sk, mask=offs_k < num_selected, other=-1)
        valid = slot >= 0
        safe_slot = tl.where(valid, slot, 0)
        keys = tl.load(
            k_base + safe_slot[:, None] * k_ss + offs_d[None, :] * k_sd, mask=valid[:, None], other=0.0
        ).to(tl.float32)
        values = tl.load(
            v_base + safe_slot[:, None] * v_ss + offs_d[None, :] * v_sd, mask=valid[:, None], other=0.0
        ).to(tl.float32)

        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, axis=1))
        # While every slot seen so far is padding the max is -inf; shift by 0 so exp() gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        probs = tl.exp(scores - shift[:, None])
        run_sum = run_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * values[None, :, :], axis=1)
        run_max = new_max

    part_row = pid_bh * num_chunks + pid_chunk
    tl.store(part_max_ptr + part_row * GROUP_PAD + offs_g, run_max)
    tl.store(part_sum_ptr + part_row * GROUP_PAD + offs_g, run_sum)
    tl.store(part_acc_ptr + (part_row * GROUP_PAD + offs_g[:, None]) * HEAD_DIM + offs_d[None, :], acc)


@triton.jit
def _sparse_decode_combine_kernel(
    part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr,
    num_kv_heads, group, num_chunks,
    out_sb, out_sh, out_sg, out_sd,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNKS_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    head = tl.program_id(1)
    # int64 so batch offsets cannot overflow on large caches.
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)

    offs_c = tl.arange(0, CHUNKS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    c_mask = offs_c < num_chunks
    part_rows = (pid_bh * num_chunks + offs_c) * GROUP_PAD + head

    part_max = tl.load(part_max_ptr + part_rows, mask=c_mask, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + part_rows, mask=c_mask, other=0.0)
    part_acc = tl.load(part_acc_ptr + part_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=c_mask[:, None], other=0.0)

    global_max = tl.max(part_max, axis=0)
    shift = tl.where(global_max == float("-inf"), 0.0, global_max)
    weight = tl.exp(part_max - shift)
    total = tl.sum(weight * part_sum, axis=0)
    weighted = tl.sum(weight[:, None] * part_acc, axis=0)
    out = tl.where(total > 0, weighted / tl.maximum(total, 1e-30), 0.0)
    tl.store(out_ptr + b * out_sb + h * out_sh + head * out_sg + offs_d * out_sd, out.to(out_ptr.dtype.element_ty))


def _group_pad(group: int) -> int:
    return triton.next_power_of_2(group)


def sparse_decode_attention(q, keys, values, indices, scale, max_chunks_per_head=MAX_CHUNKS_PER_HEAD):
    batch, kv_heads, group, head_dim = q.shape
    power_of_two = head_dim & (head_dim - 1) == 0
    assert head_dim >= 16 and power_of_two, f"triton sparse decode needs a power-of-2 head dim >= 16, got {head_dim}"
    num_selected = indices.shape[-1]
    out = torch.empty_like(q)
    if batch * kv_heads * group == 0:
        return out
    if num_selected == 0:
        return out.zero_()

    tiles = triton.cdiv(num_selected, TOKEN_BLOCK)
    tiles_per_chunk = triton.cdiv(tiles, max_chunks_per_head)
    chunk_size = tiles_per_chunk * TOKEN_BLOCK
    num_chunks = triton.cdiv(num_selected, chunk_size)
    group_pad = _group_pad(group)
    rows = batch * kv_heads * num_chunks
    part_max = torch.empty((rows, group_pad), device=q.device, dtype=torch.float32)
    part_sum = torch.empty((rows, group_pad), device=q.device, dtype=torch.float32)
    part_acc = torch.empty((rows, group_pad, head_dim), device=q.device, dtype=torch.float32)

    _sparse_decode_partial_kernel[(batch * kv_heads, num_chunks)](
        q, keys, values, indices, part_max, part_sum, part_acc,
        kv_heads, group, num_selected, chunk_size, num_chunks, float(scale),
        *q.stride(), *keys.stride(), *values.stride(), *indices.stride(),
        GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_K=TOKEN_BLOCK,
    )
    _sparse_decode_combine_kernel[(batch * kv_heads, group)](
        part_max, part_sum, part_acc, out,
        kv_heads, group, num_chunks, *out.stride(),
        GROUP_PAD=group_pad, HEAD_DIM=head_dim, CHUNKS_PAD=triton.next_power_of_2(num_chunks),
    )
    return out
