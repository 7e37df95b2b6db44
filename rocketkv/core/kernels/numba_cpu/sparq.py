"""SparQ's kernels: its approximate scores from its channel-major copy of K (``reference.scores`` with
``channels``), and the fold of a decode step's newest slot into its metadata (``methods.sparq.fold_reference``)."""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from rocketkv.core.kernels.numba_cpu.jit import JIT, REASSOCIATE


@numba.njit(**REASSOCIATE)
def _channel_scores(q, keys_t, channels, upto, out):
    batch, hkv, g, d = q.shape
    r, capacity = channels.shape[3], out.shape[3]
    live = min(upto, capacity)
    for b in range(batch):
        for h in range(hkv):
            for head in range(g):
                whole = np.float32(0.0)
                for c in range(d):
                    whole += abs(q[b, h, head, c])
                picked = np.float32(0.0)
                for j in range(r):
                    picked += abs(q[b, h, head, channels[b, h, head, j]])
                inv_tau = np.float32(math.sqrt(whole / (d * max(picked, np.float32(1e-30)))))
                row = out[b, h, head]
                row[:live] = 0.0
                for j in range(r):  # one contiguous row of K per channel
                    channel = channels[b, h, head, j]
                    weight = q[b, h, head, channel] * inv_tau
                    source = keys_t[b, h, channel]
                    for s in range(live):
                        row[s] += weight * source[s]
                row[live:] = -np.inf


def channel_scores(q: torch.Tensor, keys_t: torch.Tensor, upto, channels: torch.Tensor) -> torch.Tensor:
    """``q·k`` of each head on its ``channels`` ``[B,Hkv,g,r]`` times SparQ's 1/tau, read from channel-major K
    ``keys_t`` ``[B,Hkv,d,C]`` (fp32, contiguous): ``[B,Hkv,g,C]`` fp32, -inf from ``upto`` on."""
    out = np.empty((*q.shape[:3], keys_t.shape[-1]), np.float32)
    _channel_scores(q.detach().float().contiguous().numpy(), keys_t.detach().numpy(), channels.contiguous().numpy(),
                    int(upto), out)
    return torch.from_numpy(out)


@numba.njit(**JIT)
def _fold_slot(keys, values, keys_t, value_sum, slot):
    batch, hkv, _, d = keys.shape
    for b in range(batch):
        for h in range(hkv):
            for c in range(d):
                keys_t[b, h, c, slot] = keys[b, h, slot, c]
                value_sum[b, h, c] += values[b, h, slot, c]


def fold_slot(keys, values, keys_t, value_sum, upto) -> None:
    """Slot ``upto - 1``'s key into column ``upto - 1`` of ``keys_t`` ``[B,Hkv,d,C]``, its value added to
    ``value_sum`` ``[B,Hkv,d]``, in place (fp32)."""
    _fold_slot(keys.detach().numpy(), values.detach().numpy(), keys_t.detach().numpy(), value_sum.detach().numpy(),
               int(upto) - 1)
