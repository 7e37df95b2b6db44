"""Building blocks the methods share: dense and selected-slot attention, top-k, SnapKV window scores, counts.

Queries use the grouped layout ``[B, Hkv, g, d]``: the g query heads of a KV head share one K/V read.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from rocketkv.core import kernels
from rocketkv.core.cache import CompressedLayer, gather_slots, gather_slots_of

MASKED_ATTENTION_FRACTION = 8  # attend_indices masks instead of gathering once k >= slots / this


@dataclass
class StepCost:
    """What one decode step of one layer read, per sequence.

    The part the plan and the step's slot count determine is ``static(uptos)``: for host int64 slot counts
    ``uptos`` ``[n]`` the rows (attended, elements) ``[n, 2]`` float64; ``DecodeStats`` evaluates it once per sample
    over the slot counts of every step.  The data-dependent part is ``count`` (a device scalar, or None) times the
    host weights ``per_count`` (attended, elements), added on the device with one op per layer (reading it on the
    host every layer would stall a GPU decode)."""

    static: Callable[[torch.Tensor], torch.Tensor]
    upto: torch.Tensor
    count: torch.Tensor | None = None
    per_count: tuple[float, float] = (0.0, 0.0)

    def total(self) -> tuple[float, float]:
        """(attended, elements) of this step, read on the host (tests, benchmarks)."""
        attended, elements = self.static(self.upto.reshape(1).long().cpu())[0].tolist()
        if self.count is not None:
            count = float(self.count)
            attended, elements = attended + count * self.per_count[0], elements + count * self.per_count[1]
        return attended, elements

    @property
    def attended(self) -> float:  # tokens attended, mean over query heads
        return self.total()[0]

    @property
    def elements(self) -> float:  # K/V and metadata elements read, summed over KV heads
        return self.total()[1]


def dense_cost(layer: CompressedLayer, uptos: torch.Tensor) -> torch.Tensor:
    """Static cost rows of dense attention over slots ``[0, upto)``: each head attends to what it may see."""
    _, hkv, _, d = layer.keys.shape
    u = uptos.double()
    if layer.visible is None:
        attended = u
    else:  # per slot, the share of query heads that see it; summed up to each upto
        attended = layer.visible.double().mean(dim=(0, 1, 2)).cumsum(0).cpu()[uptos - 1]
    return torch.stack([attended, u * (2 * d * hkv)], dim=-1)


def no_static_cost(uptos: torch.Tensor) -> torch.Tensor:
    """Static cost rows of a method whose whole cost is data-dependent (its ``StepCost.count``)."""
    return torch.zeros(len(uptos), 2, dtype=torch.float64)


def topk_cost(topk: int, elements: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Static cost rows of a method attending ``min(topk, upto)`` slots per head, reading ``elements(u, attended)``."""
    def rows(uptos: torch.Tensor) -> torch.Tensor:
        u = uptos.double()
        attended = u.clamp(max=topk)
        return torch.stack([attended, elements(u, attended)], dim=-1)
    return rows


def seq_len_for_plan(prompt_len: int, max_new_tokens: int, model_max_len: int | None) -> int:
    total = prompt_len + max_new_tokens
    return min(total, model_max_len) if model_max_len else total


def covers_sequence(tokens: int, prompt_len: int, max_new_tokens: int) -> bool:
    """Whether ``tokens`` selected slots include every slot any decode step of this sample can see."""
    return tokens >= prompt_len + max_new_tokens


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def widened(table: torch.Tensor, size: int) -> torch.Tensor:
    """``table`` with its last axis zero-padded to ``size`` slots or pages: a method's metadata after the layer's
    buffers grew (eager decode only); ``table`` itself when it is already that wide."""
    short = size - table.shape[-1]
    return F.pad(table, (0, short)) if short > 0 else table


def valid_slots(layer: CompressedLayer, upto: torch.Tensor) -> torch.Tensor:
    """``[C]`` bool: the buffer slots a step sees, ``slot < upto`` (``upto`` a 0-dim device tensor)."""
    return layer.slot_index < upto


def visible_mask(layer: CompressedLayer, upto: torch.Tensor) -> torch.Tensor:
    """What each query head may attend to over the buffer: ``[1,C]`` (every head alike) or ``[B,Hkv,g,C]``."""
    valid = valid_slots(layer, upto)
    return valid[None] if layer.visible is None else layer.visible & valid


def dense_decode(layer: CompressedLayer, q: torch.Tensor, upto: torch.Tensor, scaling: float,
                 backend: str = "auto") -> tuple[torch.Tensor, StepCost]:
    """Exact attention of ``q`` over every slot it may see."""
    b, hkv, g, d = q.shape
    if layer.visible is None and kernels.use_triton(backend, q, kernels.sparse_attention_supported(d)):
        # flash-decoding over the contiguous slots [0, upto): no index, one K/V read for the group's heads
        out = kernels.dense_decode_attention(q, layer.keys, layer.values, upto, scaling, backend=backend)
    else:  # the g query heads of a group stand in the query-length axis: one K/V read serves them all
        out = F.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=visible_mask(layer, upto),
                                             scale=scaling)
    return out, StepCost(partial(dense_cost, layer), upto)


def attend_indices(layer: CompressedLayer, q: torch.Tensor, idx: torch.Tensor, scaling: float,
                   backend: str = "auto", logits: torch.Tensor | None = None) -> torch.Tensor:
    """Exact softmax attention over selected slots.

    ``idx`` is ``[B,Hkv,G,k]`` with G = 1 (one set shared by the group) or G = g (one per head); -1 pads.
    A shared set runs the Triton kernel on CUDA.  Otherwise small selections gather only their rows of K/V;
    once a set's rows (k) reach an eighth of the buffer, streaming all of it once for the g heads under a
    selection mask is cheaper than the gather (same result up to rounding).  The choice depends on shapes only, never on data.
    ``logits`` (``[B,Hkv,g,C]``, the exact fp32 ``q·k`` of every slot, when the caller has them) spare the torch
    path K: only V of the selected slots is read.
    """
    b, hkv, g, d = q.shape
    G, kk = idx.shape[2], idx.shape[3]
    slots = layer.keys.shape[2]
    if kernels.use_triton(backend, q, kernels.sparse_attention_supported(d)):
        if G == 1:
            return kernels.sparse_decode_attention(q, layer.keys, layer.values, idx[:, :, 0], scaling, backend=backend)
        if layer.keys.is_contiguous() and layer.values.is_contiguous():
            # one set per head: each (row, KV head) as a batch of g heads over the same K/V (stride 0, no copy)
            kv = [t.view(b * hkv, 1, slots, d).expand(b * hkv, g, slots, d) for t in (layer.keys, layer.values)]
            out = kernels.sparse_decode_attention(q.reshape(b * hkv, g, 1, d), *kv, idx.reshape(b * hkv, g, kk),
                                                  scaling, backend=backend)
            return out.view(b, hkv, g, d)
    if kernels.use_numba(backend, q, layer.keys, layer.values, *(() if logits is None else (logits,))):
        return kernels.attend_selected(q, layer.keys, layer.values, idx, scaling, logits)
    if logits is not None:
        safe = idx.clamp(min=0)
        probs = torch.softmax((logits.gather(-1, safe) * scaling).masked_fill_(idx < 0, float("-inf")), dim=-1)
        v_sel = gather_slots(layer.values, safe.reshape(b, hkv, G * kk)).view(b, hkv, G, kk, d)
        return torch.einsum("bhgk,bhgkd->bhgd", probs, v_sel.float()).to(q.dtype)
    if kk * MASKED_ATTENTION_FRACTION >= slots:
        # an additive mask: SDPA turns a boolean one into this itself, at a third of the call's cost.  The -1 pads
        # land in a last column, dropped: the mask keeps the buffer's alignment (a view at offset 1 is refused by
        # the memory-efficient CUDA kernel in half precision)
        selected = torch.full((b, hkv, G, slots + 1), float("-inf"), dtype=q.dtype, device=idx.device)
        selected.scatter_(-1, torch.where(idx < 0, slots, idx), 0.0)
        return F.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=selected[..., :slots],
                                              scale=scaling)
    k_sel, v_sel = gather_slots_of((layer.keys, layer.values), idx.clamp(min=0).reshape(b, hkv, G * kk))
    q_sets = q.float().view(b, hkv, G, g // G, d)  # the heads that share each set
    logits = (q_sets @ k_sel.view(b, hkv, G, kk, d).float().mT * scaling).masked_fill_((idx < 0).unsqueeze(3),
                                                                                        float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v_sel.view(b, hkv, G, kk, d).float()
    return out.view(b, hkv, g, d).to(q.dtype)


def topk_slots(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best slots along the last axis, ascending; -inf scores never count (-1 pads the end).

    Equal scores at the cut go to the lower slots, so the choice does not depend on how far past the live slots the
    buffer reaches, nor on ``topk``'s internal order: one ``topk`` over keys made distinct by the slot, one sort.
    Static shapes, no host reads."""
    k = min(k, scores.shape[-1])
    top = kernels.reference.ordered_keys(scores).topk(k, dim=-1, sorted=False)
    past = scores.shape[-1]
    slots = top.indices.masked_fill(top.values < _NEG_INF_KEY, past).sort(dim=-1).values
    return slots.masked_fill_(slots == past, -1)


# keys below this are -inf scores, whatever their slot
_NEG_INF_KEY = ((int(kernels.reference.ordered_keys(torch.tensor([float("-inf")]))[0]) >> 32) + 1) << 32


def window_scores(q_window: torch.Tensor, keys: torch.Tensor, prompt_len: int, window: int,
                  scaling: float) -> torch.Tensor:
    """SnapKV scores ``[B,Hkv,g,L-w]``: post-softmax attention of the last ``w`` prompt queries, summed over them."""
    q_win = q_window[..., -window:, :].float()
    k = keys[:, :, :prompt_len].float()
    logits = torch.einsum("bhgwd,bhsd->bhgws", q_win, k) * scaling
    q_pos = torch.arange(prompt_len - window, prompt_len, device=k.device)
    k_pos = torch.arange(prompt_len, device=k.device)
    logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=-2)[..., : prompt_len - window]


# SnapKV++'s adaptive pooling (RocketKV's first version): rows of (from this prompt length on, this kernel).  The
# method configs hold the table (``adaptive_kernel_sizes``); this is its default when a method is built in Python.
ADAPTIVE_KERNEL_SIZES = ((0, 63), (49152, 511))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _odd_kernel(value) -> bool:
    return _is_int(value) and value >= 1 and value % 2 == 1


def check_pool_kernel(method: str, kernel_size, table) -> None:
    """``kernel_size``: an odd integer >= 1 or ``auto``; ``table``: ``[[from_prompt_len, kernel], ...]`` with
    lengths rising from 0 and odd kernels.  A bad value is a ``ValueError`` naming it and what is valid."""
    if kernel_size != "auto" and not _odd_kernel(kernel_size):
        raise ValueError(f"method {method!r}: kernel_size={kernel_size!r} is not valid; give an odd integer >= 1, "
                         f"or auto (the kernel picked by prompt length from adaptive_kernel_sizes)")
    rows = list(table) if isinstance(table, (list, tuple)) else []
    well_formed = bool(rows) and all(isinstance(row, (list, tuple)) and len(row) == 2 and _is_int(row[0])
                                     and _odd_kernel(row[1]) for row in rows)
    if not (well_formed and rows[0][0] == 0 and all(a[0] < b[0] for a, b in zip(rows, rows[1:]))):
        raise ValueError(f"method {method!r}: adaptive_kernel_sizes={table!r} is not valid; give rows "
                         f"[from_prompt_len, kernel] with from_prompt_len rising from 0 and odd kernels >= 1, "
                         f"e.g. [[0, 63], [49152, 511]]")


def pool_kernel(kernel_size, table, prompt_len: int) -> int:
    """The max-pool kernel for a prompt of ``prompt_len`` tokens: ``kernel_size``, or with ``auto`` the kernel of
    the table's last row whose length ``prompt_len`` reaches."""
    if kernel_size != "auto":
        return kernel_size
    return [kernel for start, kernel in table if prompt_len >= start][-1]


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool along the last axis with stride 1 and the same length (odd kernel)."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    pooled = F.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(shape)


def keep_selection(layer: CompressedLayer, chosen: torch.Tensor, tail_start: int) -> None:
    """Keep ``chosen`` (``[B,Hkv,m]``) prefix slots, in position order, and every slot from ``tail_start`` on."""
    b, hkv = chosen.shape[:2]
    tail = torch.arange(tail_start, layer.stored, device=chosen.device).expand(b, hkv, -1)
    slots = torch.cat([chosen.sort(dim=-1).values, tail], dim=-1)
    layer.keep(slots)
