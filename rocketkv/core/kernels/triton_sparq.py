"""Triton kernel of SparQ's decode step metadata: fold the newest slot into the channel-major copy of K and the
running sum of V (``methods.sparq.fold_reference``), one launch instead of five ops.  It reads the step's slot count
``upto`` (a 0-dim int64 device tensor) itself; one program serves one KV head of one row."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fold_slot_kernel(k_ptr, v_ptr, kt_ptr, sum_ptr, upto_ptr, num_kv_heads, head_dim,
                      k_sb, k_sh, k_ss, k_sd, v_sb, v_sh, v_ss, v_sd, t_sb, t_sh, t_sd, t_ss, s_sb, s_sh, s_sd,
                      D_PAD: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    h = (pid % num_kv_heads).to(tl.int64)
    slot = tl.load(upto_ptr) - 1
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    key = tl.load(k_ptr + b * k_sb + h * k_sh + slot * k_ss + offs_d * k_sd, mask=d_mask, other=0.0)
    tl.store(kt_ptr + b * t_sb + h * t_sh + offs_d * t_sd + slot * t_ss, key.to(kt_ptr.dtype.element_ty), mask=d_mask)
    value = tl.load(v_ptr + b * v_sb + h * v_sh + slot * v_ss + offs_d * v_sd, mask=d_mask, other=0.0)
    sums = sum_ptr + b * s_sb + h * s_sh + offs_d * s_sd
    tl.store(sums, tl.load(sums, mask=d_mask, other=0.0) + value.to(tl.float32), mask=d_mask)


def fold_slot(keys, values, keys_t, value_sum, upto):
    batch, kv_heads, _, head_dim = keys.shape
    _fold_slot_kernel[(batch * kv_heads,)](
        keys, values, keys_t, value_sum, upto, kv_heads, head_dim,
        *keys.stride(), *values.stride(), *keys_t.stride(), *value_sum.stride(), D_PAD=triton.next_power_of_2(head_dim))
