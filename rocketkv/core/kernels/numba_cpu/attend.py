"""Exact softmax attention over selected slots (``ops.attend_indices``' torch paths)."""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from rocketkv.core.kernels.numba_cpu.jit import REASSOCIATE


@numba.njit(**REASSOCIATE)
def _attend(q, keys, values, idx, scale, logits, out):
    batch, hkv, g, d = q.shape
    sets, k = idx.shape[2], idx.shape[3]
    weights = np.empty(k, np.float32)
    acc = np.empty(d, np.float32)
    for b in range(batch):
        for h in range(hkv):
            for head in range(g):
                chosen = idx[b, h, head // (g // sets)]
                top = -np.inf
                for j in range(k):
                    slot = chosen[j]
                    if slot < 0:
                        weights[j] = -np.inf
                        continue
                    if logits.shape[3] > 0:
                        w = logits[b, h, head, slot] * scale
                    else:
                        w = np.float32(0.0)
                        for c in range(d):
                            w += q[b, h, head, c] * keys[b, h, slot, c]
                        w *= scale
                    weights[j] = w
                    top = max(top, w)
                whole = np.float32(0.0)
                for j in range(k):  # the exponentials first: the loop below is then loads and FMAs only, short
                    p = np.float32(math.exp(weights[j] - top))  # enough for the core to run several rows of V ahead
                    weights[j] = p
                    whole += p
                acc[:] = 0.0
                for j in range(k):
                    slot = chosen[j]
                    if slot < 0:
                        continue
                    p = weights[j]
                    for c in range(d):
                        acc[c] += p * values[b, h, slot, c]
                for c in range(d):
                    out[b, h, head, c] = acc[c] / whole


_NO_LOGITS = np.empty((0, 0, 0, 0), np.float32)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, scale: float,
           logits: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.attend_indices`` on the CPU: exact softmax attention of ``q`` ``[B,Hkv,g,d]`` over the slots ``idx``
    ``[B,Hkv,G,k]`` (G = 1: one set for the group, G = g: one per head; -1 pads), from ``logits`` (the fp32 ``q·k``
    of every slot) when given.  fp32 K/V."""
    out = np.empty(q.shape, np.float32)
    _attend(q.detach().float().contiguous().numpy(), keys.detach().numpy(), values.detach().numpy(),
            idx.contiguous().numpy(), np.float32(scale),
            _NO_LOGITS if logits is None else logits.detach().numpy(), out)
    return torch.from_numpy(out).to(q.dtype)
