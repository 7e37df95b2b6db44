"""Exact top units of score rows (``reference.select_units``) and the distinct slots / channels a group read
(``reference.union_reads``).

The top-m units of a row by (score desc, unit asc) are those whose ordered key (``reference.ordered_keys``: the
score's order-preserving bits above, the unit reversed below) reaches the m-th largest: ``_top_m`` finds the m-th
best value by radix selection among the units that reach a sampled lower bound, the lower units first at equal
values.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from rocketkv.core.kernels.numba_cpu.jit import JIT

_NO_SLOT = -1
_PRUNE_FROM = 1024  # units per row from which a sampled bound pays for itself
_STRIDE = 8  # the sample: every 8th unit
_LEAST = np.int32(-2147483648)  # no ordered value is below it


@numba.njit(**JIT, inline="always")
def _ordered(bits):
    """A float32's bits (as int32) mapped to an int32 in the float's order: the high half of
    ``reference.ordered_keys``."""
    return np.int32(((bits >> 31) & 0x7FFFFFFF) ^ bits)


@numba.njit(**JIT)
def _rank_value(values, c, rank, hist):
    """The ``rank``-th largest (1-based) of ``values[:c]`` (int32), by radix selection: four passes that count
    each 8-bit digit under the digits fixed so far, branch-free, at the same speed on sorted data as on random."""
    prefix = np.int64(0)
    mask = np.int64(0)
    for shift in (24, 16, 8, 0):
        hist[:] = 0
        for i in range(c):
            u = np.int64(values[i]) + 2147483648  # int32 order as [0, 2^32)
            hist[(u >> shift) & 0xFF] += (u & mask) == prefix
        digit = 255
        while hist[digit] < rank:
            rank -= hist[digit]
            digit -= 1
        prefix |= np.int64(digit) << shift
        mask |= np.int64(0xFF) << shift
    return np.int32(prefix - 2147483648)


@numba.njit(**JIT)
def _candidates(bits, n, bound, scratch, units):
    """The units of ``[0, n)`` whose ordered value reaches ``bound``, in unit order, their values into ``scratch``;
    returns how many.  A branch: the sampled bound lets a few percent through, in runs on smooth rows, so it is
    predicted well, and it spares the two stores per unit of a branch-free compaction (two thirds of the time)."""
    c = 0
    for u in range(n):
        o = _ordered(bits[u])
        if o >= bound:
            scratch[c] = o
            units[c] = u
            c += 1
    return c


@numba.njit(**JIT)
def _top_m(row, n, m, scratch, units, keys, hist):
    """The m best of units ``[0, n)`` of ``row`` by (score desc, unit asc), ascending into ``units[:m]``, their keys
    (``reference.ordered_keys``) into ``keys[:m]``; returns m.

    On long rows only the units reaching a lower bound on the m-th best are candidates: the value of a sample
    (every ``_STRIDE``-th unit) expected to let about 2m units through, checked by counting them (too few: every
    unit is a candidate), so the result is exact whatever the data.  Among the candidates, the m-th best value
    is found by radix selection, and equal values at the cut go to the lower units."""
    bits = row.view(np.int32)
    bound = _LEAST
    if n >= _PRUNE_FROM:
        drawn = (n + _STRIDE - 1) // _STRIDE
        for j in range(drawn):
            scratch[j] = _ordered(bits[j * _STRIDE])
        bound = _rank_value(scratch, drawn, min(drawn, 2 * m // _STRIDE + 1), hist)
    c = _candidates(bits, n, bound, scratch, units)
    if c < m:  # the sample misled: every unit is a candidate
        c = _candidates(bits, n, _LEAST, scratch, units)
    cut = _rank_value(scratch, c, m, hist)
    above = 0
    for i in range(c):
        above += scratch[i] > cut
    ties = m - above  # units at the cut's value that make it, lowest first
    chosen = 0
    for i in range(c):
        o = scratch[i]
        take = (o > cut) | ((o == cut) & (ties > 0))
        ties -= o == cut
        keys[chosen] = (np.int64(o) << 32) | (n - 1 - units[i])
        units[chosen] = units[i]
        chosen += take
    return chosen


@numba.njit(**JIT)
def _select(scores, upto, page_size, budget, width, split, probs, slots, counts, mass):
    rows, units = scores.shape
    n = min(units, (upto + page_size - 1) // page_size)  # the live units: holding slots below upto
    m = min(n, -(-budget // page_size) + 1 if split else budget)
    scratch = np.empty(max(n, 1), np.int32)
    hist = np.empty(256, np.int64)
    keys = np.empty(max(n, 1), np.int64)
    sel_units = np.empty(max(n, 1), np.int64)
    take = np.empty(max(m, 1), np.int64)
    for r in range(rows):
        row = scores[r]
        chosen = 0
        if m > 0:
            chosen = _top_m(row, n, m, scratch, sel_units, keys, hist)
        for j in range(chosen):
            take[j] = min(page_size, upto - sel_units[j] * page_size)
        if split:  # rank order gives slots until the budget; the unit at the cut gives its lowest slots
            left = budget
            for j in np.argsort(-keys[:chosen]):
                take[j] = min(take[j], left)
                left -= take[j]
        total = 0
        out = 0
        part = 0.0
        for j in range(chosen):
            total += take[j]
            if probs.shape[0] > 0:
                part += probs[r, sel_units[j]]
            for s in range(take[j]):
                if out < width:
                    slots[r, out] = sel_units[j] * page_size + s
                    out += 1
        for s in range(out, width):
            slots[r, s] = _NO_SLOT
        counts[r] = total
        if probs.shape[0] > 0:  # the chosen slots' share of the softmax over the live slots (1 when all are chosen)
            mass[r] = 1.0 if total >= upto else part


_NO_PROBS = np.empty((0, 0), np.float32)


def select(scores: torch.Tensor, upto: torch.Tensor, page_size: int, budget: int, width: int, split: bool,
           mass: bool = False, masked: bool = False):
    """``reference.select_units``.  Units past ``upto`` are never ranked; ``masked`` (they score -inf) lets the mass's
    softmax run over whole rows, contiguous, instead of the live part of each."""
    if mass and page_size != 1:
        raise ValueError(f"select: mass is the chosen slots' softmax share, for slot units; got page_size={page_size}")
    lead, units = scores.shape[:-1], scores.shape[-1]
    flat = scores.detach().float().reshape(-1, units).contiguous().numpy()
    slots = np.empty((flat.shape[0], width), np.int64)
    counts = np.empty(flat.shape[0], np.int64)
    shares = np.empty(flat.shape[0], np.float32)
    live = int(upto)
    probs = _NO_PROBS
    if mass:
        probs = torch.softmax(torch.from_numpy(flat if masked else flat[:, :live]), dim=-1).numpy()
    _select(flat, live, page_size, budget, width, split, probs, slots, counts, shares)
    return (torch.from_numpy(slots).view(*lead, width), torch.from_numpy(counts).view(lead),
            torch.from_numpy(shares).view(lead) if mass else None)


@numba.njit(**JIT)
def _distinct(sets, limit, seen, stamp):
    """How many distinct values in ``[0, limit)`` ``sets`` ``[n, k]`` holds; ``seen`` marks them with ``stamp``."""
    found = 0
    for i in range(sets.shape[0]):
        for j in range(sets.shape[1]):
            v = sets[i, j]
            if 0 <= v < limit and seen[v] != stamp:
                seen[v] = stamp
                found += 1
    return found


@numba.njit(**JIT)
def _union_reads(idx, upto, token_weight, n_slots, channels, n_channels, reads):
    batch, hkv = idx.shape[0], idx.shape[1]
    seen_slots = np.zeros(max(n_slots, 1), np.int64)
    seen_channels = np.zeros(max(n_channels, 1), np.int64)
    for b in range(batch):
        for h in range(hkv):
            stamp = b * hkv + h + 1
            reads[b, h] = _distinct(idx[b, h], n_slots, seen_slots, stamp) * token_weight
            if channels.shape[3] > 0:
                reads[b, h] += _distinct(channels[b, h], n_channels, seen_channels, stamp) * upto


_NO_CHANNELS = np.empty((0, 0, 0, 0), np.int64)


def union_reads(idx, upto, token_weight: int, n_slots: int, channels=None, n_channels: int = 0) -> torch.Tensor:
    """``reference.union_reads``: per (row, KV head) the distinct slots of the g heads' sets times ``token_weight``,
    plus with ``channels`` their distinct channels times ``upto``."""
    reads = np.empty(idx.shape[:2], np.int64)
    _union_reads(idx.contiguous().numpy(), int(upto), token_weight, n_slots,
                 _NO_CHANNELS if channels is None else channels.contiguous().numpy(), n_channels, reads)
    return torch.from_numpy(reads)
