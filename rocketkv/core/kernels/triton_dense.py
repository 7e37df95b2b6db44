"""Dense decode attention over the contiguous valid slots ``[0, upto)``: full KV's step, flash-decoding style.

No index indirection: slot ``i`` of a head is row ``i`` of its K/V, so a tile of ``BLOCK_N`` slots is one strided
block and each row's ``head_dim`` contiguous elements load as 16-byte vectors.  The g query heads of a KV group
are the rows of one tile, padded to 16 (the smallest MMA shape), so each K/V tile is read once for the group and
both products run through ``tl.dot``; a ``tl.range(..., num_stages=...)`` loop whose loads feed dots is what
Triton's software pipeliner stages through shared memory with asynchronous copies (cp.async) on sm_80+.

``upto`` is a 0-dim device tensor read inside the kernel and the grid depends on shapes only, so the call can be
captured in a CUDA graph and replayed as ``upto`` grows.  The sequence is split into a fixed number of chunks
(one wave of programs over the SMs at batch 1 and 8); each chunk's slots are sized from ``upto``
on the device, so every program gets an even share of the live slots.  A combine kernel merges the chunks.
``benchmarks/kernel_aot.py`` shows what this compiles to for sm_90 (registers, spills, load widths, cp.async).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rocketkv.core.kernels.triton_decode import _sparse_decode_combine_kernel

BLOCK_N = 64  # slots per tile: with d=128 in 16-bit, 16 KiB of K plus 16 KiB of V per pipeline stage
NUM_STAGES = 3
NUM_WARPS = 4
MMA_ROWS = 16  # tl.dot needs at least 16 rows: a group of g query heads is padded up to this
# Programs resident per SM at these settings on sm_90 (benchmarks/kernel_aot.py: 130 registers x 128 threads and
# 70 KiB of shared memory per program): the split aims at one full wave of them, since every program does the
# same work and a second, partial wave would cost as much as a full one.
PROGRAMS_PER_SM = 3
DEFAULT_SMS = 132  # H100 / H200, when the device cannot be asked (CPU tensors under the interpreter)
MIN_SPLIT_SLOTS = 4 * BLOCK_N  # fewer slots per chunk and the combine's traffic starts to matter


@triton.jit
def _dense_decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, upto_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,
    num_kv_heads, group, splits, scale,
    q_sb, q_sh, q_sg, q_sd,
    k_sb, k_sh, k_ss, k_sd,
    v_sb, v_sh, v_ss, v_sd,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    # int64 so batch offsets cannot overflow on large caches.
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)

    # This chunk's slots: an even share of the live tiles, from upto on the device.
    upto = tl.load(upto_ptr).to(tl.int32)
    tiles_per_split = tl.cdiv(tl.cdiv(upto, BLOCK_N), splits)
    lo = pid_split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, upto)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < group
    q = tl.load(q_ptr + b * q_sb + h * q_sh + offs_g[:, None] * q_sg + offs_d[None, :] * q_sd,
                mask=g_mask[:, None], other=0.0).to(k_ptr.dtype.element_ty)
    k_ptrs = k_ptr + b * k_sb + h * k_sh + offs_n[:, None] * k_ss + offs_d[None, :] * k_sd
    v_ptrs = v_ptr + b * v_sb + h * v_sh + offs_n[:, None] * v_ss + offs_d[None, :] * v_sd
    qk_scale = scale * 1.4426950408889634  # exp2 below: fold log2(e) into the scale

    run_max = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        valid = (start + offs_n) < hi
        keys = tl.load(k_ptrs + start * k_ss, mask=valid[:, None], other=0.0)
        values = tl.load(v_ptrs + start * v_ss, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # every tile holds a valid slot (start < hi), so new_max is finite
        new_max = tl.maximum(run_max, tl.max(scores, axis=1))
        rescale = tl.exp2(run_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
        run_max = new_max

    # Partials in the combine's layout [B*Hkv*splits, group, (d)]; the max back in natural-log units.
    part_row = (pid_bh * splits + pid_split) * group + offs_g
    tl.store(part_max_ptr + part_row, run_max * 0.6931471805599453, mask=g_mask)
    tl.store(part_sum_ptr + part_row, run_sum, mask=g_mask)
    tl.store(part_acc_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS


def num_splits(batch: int, kv_heads: int, capacity: int, sms: int = DEFAULT_SMS) -> int:
    """Chunks per KV head: at most one wave of programs over the SMs, no chunk under MIN_SPLIT_SLOTS of the
    capacity (shapes only, so a captured graph keeps its grid)."""
    return max(1, min(sms * PROGRAMS_PER_SM // max(1, batch * kv_heads), triton.cdiv(capacity, MIN_SPLIT_SLOTS)))


def dense_decode_attention(q, keys, values, upto, scale, splits=None):
    """softmax(q K[:upto]^T * scale) V[:upto] per query head -> [B, Hkv, g, d] in q's dtype.

    q [B, Hkv, g, d]; keys / values [B, Hkv, C, d] (any strides); upto a 0-dim integer tensor on q's device,
    0 <= upto <= C (rows with no slot give zeros).  ``splits`` overrides ``num_splits`` (tests).
    """
    batch, kv_heads, group, head_dim = q.shape
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"needs a power-of-2 head dim >= 16, got {head_dim}"
    out = torch.empty_like(q)
    if batch * kv_heads * group == 0:
        return out
    splits = splits or num_splits(batch, kv_heads, keys.shape[2], _sm_count(q.device))
    rows = batch * kv_heads * splits * group
    part_max = torch.empty(rows, device=q.device, dtype=torch.float32)
    part_sum = torch.empty(rows, device=q.device, dtype=torch.float32)
    part_acc = torch.empty((rows, head_dim), device=q.device, dtype=torch.float32)
    group_pad = max(MMA_ROWS, triton.next_power_of_2(group))
    _dense_decode_partial_kernel[(batch * kv_heads, splits)](
        q, keys, values, upto, part_max, part_sum, part_acc,
        kv_heads, group, splits, float(scale),
        *q.stride(), *keys.stride(), *values.stride(),
        GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES,
        PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
    )
    # the partials are laid out [row, group]: the combine's row stride (its GROUP_PAD) is the group itself
    _sparse_decode_combine_kernel[(batch * kv_heads, group)](
        part_max, part_sum, part_acc, out,
        kv_heads, group, splits, *out.stride(),
        GROUP_PAD=group, HEAD_DIM=head_dim, CHUNKS_PAD=triton.next_power_of_2(splits),
    )
    return out
