"""Page metadata kernels: fold the newest key into its page's min/max (``pages.fold_reference``) and HSA's page
probabilities (``reference.hsa_page_probs``)."""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from rocketkv.core.kernels.numba_cpu.jit import JIT, REASSOCIATE


@numba.njit(**JIT)
def _fold_page_bounds(keys, page_min_t, page_max_t, slot, page_size):
    page = slot // page_size
    opens = slot % page_size == 0  # a page's first slot replaces its bounds
    batch, hkv, _, d = keys.shape
    for b in range(batch):
        for h in range(hkv):
            for c in range(d):
                k = keys[b, h, slot, c]
                page_min_t[b, h, c, page] = k if opens else min(page_min_t[b, h, c, page], k)
                page_max_t[b, h, c, page] = k if opens else max(page_max_t[b, h, c, page], k)


def fold_page_bounds(keys, page_min_t, page_max_t, upto, page_size: int) -> None:
    """``pages.fold_reference``: fold the key of slot ``upto - 1`` into its page's min/max, in place."""
    _fold_page_bounds(keys.detach().numpy(), page_min_t.detach().numpy(), page_max_t.detach().numpy(),
                      int(upto) - 1, page_size)


@numba.njit(**REASSOCIATE)
def _hsa_page_probs(q, page_min_t, page_max_t, top, upto, page_size, probs):
    batch, hkv, g, d = q.shape
    r = top.shape[-1]
    pages = page_max_t.shape[-1]
    live = min(pages, (upto + page_size - 1) // page_size)
    weights = np.empty((g, r), np.float32)
    use_max = np.empty(r, np.bool_)
    z = np.empty(live, np.float32)
    for b in range(batch):
        for h in range(hkv):
            probs[b, h, :] = 0.0
            for i in range(r):  # the page max where the group's summed query is positive, else the min
                summed = np.float32(0.0)
                for head in range(g):
                    summed += q[b, h, head, top[b, h, i]]
                use_max[i] = summed > 0
            for head in range(g):  # SparQ's temperature: 1/tau = 1/sqrt(d·‖q_r‖₁/‖q‖₁), none for a zero query
                whole = np.float32(0.0)
                for c in range(d):
                    whole += abs(q[b, h, head, c])
                part = np.float32(0.0)
                for i in range(r):
                    part += abs(q[b, h, head, top[b, h, i]])
                tau2 = part * d / max(whole, np.float32(1e-30))
                scale = np.float32(1.0 / math.sqrt(tau2)) if tau2 > 0 else np.float32(1.0)
                for i in range(r):
                    weights[head, i] = q[b, h, head, top[b, h, i]] * scale
            for head in range(g):
                z[:] = 0.0
                for i in range(r):
                    c = top[b, h, i]
                    table = page_max_t[b, h, c] if use_max[i] else page_min_t[b, h, c]
                    w = weights[head, i]
                    for p in range(live):
                        z[p] += w * table[p]
                top_z = -np.inf
                for p in range(live):
                    top_z = max(top_z, z[p])
                total = np.float32(0.0)
                for p in range(live):  # a page's live slots share its score: slots · exp(z - max)
                    z[p] = min(page_size, upto - p * page_size) * math.exp(z[p] - top_z)
                    total += z[p]
                for p in range(live):
                    probs[b, h, p] += z[p] / total
            for p in range(live):
                probs[b, h, p] /= g * min(page_size, upto - p * page_size)


def hsa_page_probs(q, page_min_t, page_max_t, upto, page_size: int, channels: int) -> torch.Tensor:
    """``reference.hsa_page_probs`` ``[B, Hkv, P]`` (0 past ``upto``), with the group's top channels chosen by the
    same ``topk`` as there (its order among equal |q| sums is torch's), the rest in one call."""
    qf = q.detach().float()
    top = qf.abs().sum(2).topk(channels, dim=-1, sorted=False).indices  # [B,Hkv,r]
    probs = np.empty((q.shape[0], q.shape[1], page_max_t.shape[-1]), np.float32)
    _hsa_page_probs(qf.contiguous().numpy(), page_min_t.detach().numpy(), page_max_t.detach().numpy(),
                    top.contiguous().numpy(), int(upto), page_size, probs)
    return torch.from_numpy(probs)
