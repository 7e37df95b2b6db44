"""The contract every KV method implements, and the attention primitives they share.

Prefill attention is always exact and dense; a method only decides what the cache keeps after the prefill
(``compress``), what metadata it maintains (``index``) and how a decode step attends (``decode``).  Query
tensors use the grouped layout ``[B, Hkv, g, d]`` so K/V are never repeated per query head.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rocketkv.cache import CompressedLayer, gather_slots

METHODS: dict[str, type["Method"]] = {}

MIN_BUDGET = 16
MASKED_ATTENTION_FRACTION = 16  # attend_indices masks instead of gathering once G·k >= slots / this
UNION_FRACTION = 2  # ... and on CPU attends only the union of the selections when it is at most slots / this,
UNION_MIN_SLOTS = 4096  # over at least this many slots (below, finding the union costs about what it saves)


def register(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls
    return cls


@dataclass
class StepCost:
    """What one decode step of one layer touched, per sequence.

    Data-dependent counts stay 0-dim float64 tensors on the device: reading them on the host every layer would
    stall a GPU decode; the session sums them and reads the totals once, in ``stats()``.
    """

    attended: float | torch.Tensor  # tokens attended, mean over query heads
    elements: float | torch.Tensor  # K/V and metadata elements read, summed over KV heads


@dataclass
class Method:
    """Base class. Subclasses set ``name`` and override the hooks they need.

    ``budget`` is the paper's token budget ``t``: per KV group, K+V traffic of one decode step in
    token-equivalents, approximation traffic included.
    """

    budget: int | None = None
    window: int = 32
    decode_last_prompt_token: bool = True
    skip_layers: int = 0
    kernels: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    name = ""
    uses_budget = True
    is_reference = False  # the dense baseline other methods are compared with (full KV)

    def __post_init__(self):
        if self.extra:
            raise ValueError(f"method {self.name!r}: unknown options {sorted(self.extra)}; valid: "
                             f"{sorted(f for f in self.__dataclass_fields__ if f != 'extra')}")
        if self.uses_budget:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise ValueError(f"budget={self.budget!r} is not valid for method {self.name!r}: "
                                 f"give a positive integer number of tokens (>= {MIN_BUDGET})")
            if self.budget < MIN_BUDGET:
                raise ValueError(f"budget={self.budget} is below the minimum of {MIN_BUDGET} tokens "
                                 f"for method {self.name!r}")
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")
        if self.skip_layers < 0:
            raise ValueError(f"skip_layers={self.skip_layers} must be >= 0")

    # ------------------------------------------------------------------ planning
    def plan(self, prompt_len: int, max_new_tokens: int, head_dim: int, model_max_len: int | None = None,
             group_size: int = 1) -> dict:
        """The concrete parameters used for one sample; pure and cheap.

        ``plan["dense"]`` is True when, for this sample, the method keeps every token and attends to every
        stored slot at every step (e.g. a budget at or above the sequence): the session then runs it as full
        KV, bit for bit, and a grid decodes all such cells once.
        """
        return {}

    # ------------------------------------------------------------------ hooks
    def compress(self, layer: CompressedLayer, q_window: torch.Tensor, prompt_len: int, plan: dict,
                 scaling: float) -> None:
        """Called once after the exact prefill of slots ``[0, prompt_len)``.

        ``q_window`` (``[B,Hkv,g,n,d]``) holds the last ``n >= window`` queries of that prefill.
        """

    def index(self, layer: CompressedLayer, plan: dict, upto: int | None = None) -> None:
        """Bring method metadata up to date with stored slots ``[0, upto)`` (all by default)."""

    def decode(self, layer: CompressedLayer, q: torch.Tensor, upto: int, plan: dict,
               scaling: float) -> tuple[torch.Tensor, StepCost]:
        """Attention of one query token per head, ``q`` ``[B,Hkv,g,d]``, over stored slots ``[0, upto)``."""
        return dense_decode(layer, q, upto, scaling)

    def decode_many(self, layer: CompressedLayer, q: torch.Tensor, first_slot: int, plan: dict,
                    scaling: float) -> tuple[torch.Tensor, StepCost]:
        """``n`` consecutive decode steps in one call (the verification of a draft): ``q`` ``[B,Hkv,g,n,d]``,
        token ``i`` sees slots ``[0, first_slot + i]`` and metadata built from those slots only, as if the
        tokens had been decoded one by one.  Returns ``[B,Hkv,g,n,d]`` and per-token costs (``[n]`` tensors).

        This default runs the steps one by one; methods override it with one vectorised pass."""
        outs, attended, elements = [], [], []
        for i in range(q.shape[3]):
            upto = first_slot + i + 1
            self.index(layer, plan, upto)
            out, cost = self.decode(layer, q[:, :, :, i], upto, plan, scaling)
            outs.append(out)
            attended.append(torch.as_tensor(cost.attended, dtype=torch.float64, device=q.device))
            elements.append(torch.as_tensor(cost.elements, dtype=torch.float64, device=q.device))
        return torch.stack(outs, dim=3), StepCost(torch.stack(attended), torch.stack(elements))


# ---------------------------------------------------------------------- shared primitives
def seq_len_for_plan(prompt_len: int, max_new_tokens: int, model_max_len: int | None) -> int:
    total = prompt_len + max_new_tokens
    return min(total, model_max_len) if model_max_len else total


def covers_sequence(tokens: int, prompt_len: int, max_new_tokens: int) -> bool:
    """Whether ``tokens`` selected slots include every slot any decode step of this sample can see."""
    return tokens >= prompt_len + max_new_tokens


def visible_mask(layer: CompressedLayer, upto: int) -> torch.Tensor | None:
    """``[B,Hkv,g,upto]`` per-head visibility, or None when every slot is visible to every head."""
    return None if layer.visible is None else layer.visible[..., :upto]


def dense_decode(layer: CompressedLayer, q: torch.Tensor, upto: int, scaling: float) -> tuple[torch.Tensor, StepCost]:
    k, v = layer.keys[:, :, :upto], layer.values[:, :, :upto]
    vis = visible_mask(layer, upto)
    # The g query heads of a group stand in the query-length axis: one K/V read serves them all.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scaling)
    attended = float(upto) if vis is None else mean_count(vis.sum(-1))
    hkv, d = k.shape[1], k.shape[-1]
    return out, StepCost(attended, float(upto * 2 * d * hkv))


def dense_decode_many(layer: CompressedLayer, q: torch.Tensor, first_slot: int,
                      scaling: float) -> tuple[torch.Tensor, StepCost]:
    """``dense_decode`` for ``n`` consecutive tokens (see ``Method.decode_many``)."""
    b, hkv, g, n, d = q.shape
    vis = causal_rows(layer, first_slot, n, g)
    upto = first_slot + n
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, g * n, d), layer.keys[:, :, :upto],
                                         layer.values[:, :, :upto], attn_mask=vis, scale=scaling)
    per_token = token_uptos(first_slot, n, q.device)
    attended = per_token if layer.visible is None else per_token_mean(vis.sum(-1), g, n)
    return out.view(b, hkv, g, n, d), StepCost(attended, per_token * (2 * d * hkv))


def token_uptos(first_slot: int, n: int, device) -> torch.Tensor:
    """``[n]`` float64: how many slots each of ``n`` consecutive tokens sees (``first_slot + i + 1``)."""
    return torch.arange(first_slot + 1, first_slot + n + 1, device=device, dtype=torch.float64)


def token_sees(slots: torch.Tensor, first_slot: int, n: int) -> torch.Tensor:
    """``[n, len(slots)]``: whether token i of ``n`` consecutive tokens (the first stored at ``first_slot``) sees
    each slot index in ``slots``, i.e. ``slot <= first_slot + i``."""
    return slots <= (first_slot + torch.arange(n, device=slots.device))[:, None]


def per_token_group_mean(counts: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """``mean_count`` per token of per-group counts with the tokens folded into the batch axis (``[B·n,Hkv,1]``,
    token-minor) -> ``[n]`` float64."""
    return counts.view(b, n, -1).float().mean(dim=(0, 2)).double()


def causal_rows(layer: CompressedLayer, first_slot: int, n: int, g: int) -> torch.Tensor:
    """``[B,Hkv,g·n,first_slot+n]`` visibility of ``n`` consecutive tokens' query heads, folded head-major
    (row ``j·n + i`` is head j of token i): token i sees slots up to ``first_slot + i``, within its head's
    ``visible`` mask."""
    upto = first_slot + n
    causal = token_sees(torch.arange(upto, device=layer.keys.device), first_slot, n)  # [n,S]
    b, hkv = layer.keys.shape[:2]
    vis = causal.expand(b, hkv, g, n, upto) if layer.visible is None else layer.visible[..., None, :upto] & causal
    return vis.reshape(b, hkv, g * n, upto)


def hide_later_slots_(scores: torch.Tensor, first_slot: int, n: int, g: int,
                      visible: torch.Tensor | None = None) -> torch.Tensor:
    """In place on ``[B,Hkv,g·n,S]`` scores of folded rows (``causal_rows``' layout): -inf where token i would see a
    slot after ``first_slot + i`` (only the last ``n - 1`` columns can be), or a slot ``visible`` (``[B,Hkv,g,S]``)
    hides from its head."""
    b, hkv = scores.shape[:2]
    if n > 1:
        later = torch.ones(n, n - 1, dtype=torch.bool, device=scores.device).triu()  # [token, slot - first_slot - 1]
        scores[..., first_slot + 1:first_slot + n].view(b, hkv, g, n, n - 1).masked_fill_(later, float("-inf"))
    if visible is not None:
        hidden = ~visible[..., None, :scores.shape[-1]].expand(b, hkv, g, n, scores.shape[-1])
        scores.view(b, hkv, g, n, -1).masked_fill_(hidden, float("-inf"))
    return scores


def prefix_means(values: torch.Tensor, first_slot: int, n: int) -> torch.Tensor:
    """``[B,Hkv,n,d]`` float32: the mean of ``values`` over slots ``[0, first_slot + i]`` for token i, from one sum of
    the slots every token sees and a running sum of the rest."""
    seen_by_all = values[:, :, :first_slot + 1].float().sum(dim=2, keepdim=True)
    running = values[:, :, first_slot + 1:first_slot + n].float().cumsum(dim=2) + seen_by_all
    return torch.cat([seen_by_all, running], dim=2) / token_uptos(first_slot, n, values.device).float()[:, None]


def per_token_mean(counts: torch.Tensor, g: int, n: int) -> torch.Tensor:
    """``mean_count`` per token of folded rows: ``counts`` ``[B,Hkv,g·n]`` -> ``[n]`` float64."""
    return counts.reshape(*counts.shape[:2], g, n).float().mean(dim=(0, 1, 2)).double()


def per_token_union(idx: torch.Tensor, g: int, n: int, n_slots: int) -> torch.Tensor:
    """``union_count`` per token, summed over batch and KV heads, of folded rows ``[B,Hkv,g·n,k]`` -> ``[n]``."""
    b, hkv, _, k = idx.shape
    per_token = idx.reshape(b, hkv, g, n, k).transpose(2, 3).reshape(b, hkv * n, g, k)
    return union_count(per_token, n_slots).view(b, hkv, n).sum(dim=(0, 1)).double()


def attend_indices(layer: CompressedLayer, q: torch.Tensor, idx: torch.Tensor, upto: int,
                   scaling: float) -> torch.Tensor:
    """Exact softmax attention over selected slots.

    ``idx`` is ``[B,Hkv,G,k]`` with G = 1 (one set shared by the group) or G = g (one per head); -1 pads.
    Small selections gather only their rows of K/V; once the gathered rows (G·k) reach a sixteenth of the
    slots, streaming all of K/V under a selection mask is cheaper than the gather (same result up to rounding).
    """
    b, hkv, g, d = q.shape
    G, kk = idx.shape[2], idx.shape[3]
    if G * kk * MASKED_ATTENTION_FRACTION >= upto:
        keys, values = layer.keys[:, :, :upto], layer.values[:, :, :upto]
        if upto >= UNION_MIN_SLOTS and host_reads_are_cheap(q.device):  # the union's size is read on the host
            keys, values, idx, upto = _union_of_selections(keys, values, idx, upto)
        # an additive mask: SDPA turns a boolean one into this itself, at a third of the call's cost
        selected = torch.full((b, hkv, G, upto + 1), float("-inf"), dtype=q.dtype, device=idx.device)
        selected.scatter_(-1, idx.clamp(min=-1) + 1, 0.0)  # -1 pads land in column 0, dropped
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=selected[..., 1:], scale=scaling)
    safe = idx.clamp(min=0).reshape(b, hkv, G * kk)
    k_sel = gather_slots(layer.keys[:, :, :upto], safe).view(b, hkv, G, kk, d)
    v_sel = gather_slots(layer.values[:, :, :upto], safe).view(b, hkv, G, kk, d)
    logits = torch.einsum("bhgd,bhgkd->bhgk", q.float(), k_sel.float().expand(b, hkv, g, kk, d)) * scaling
    logits = logits.masked_fill((idx < 0).expand(b, hkv, g, kk), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgk,bhgkd->bhgd", probs, v_sel.float().expand(b, hkv, g, kk, d))
    return out.to(q.dtype)


def host_reads_are_cheap(device: torch.device) -> bool:
    """Whether a decode step may read a tensor back to the host: free on CPU, a stall of the stream on a GPU."""
    return device.type == "cpu"


def _union_of_selections(keys, values, idx, upto):
    """The slots any row of ``idx`` selects, gathered once per KV head: (keys, values, ``idx`` renumbered into
    them, their count).  Rows of a verified draft (consecutive tokens, heads of a group) mostly select the same
    slots, so attending the union is much cheaper than attending every slot under a mask.  When the union covers
    most slots, the inputs are returned as they are."""
    b, hkv = idx.shape[:2]
    selected = selected_slots(idx, upto)
    n_union = int(selected.sum(-1).max())
    if n_union * UNION_FRACTION > upto:
        return keys, values, idx, upto
    rank = selected.cumsum(-1) - 1  # position of each selected slot in the union, in slot order
    order = torch.zeros(b, hkv, n_union + 1, dtype=torch.long, device=idx.device)
    order.scatter_(-1, rank.masked_fill(~selected, n_union), torch.arange(upto, device=idx.device).expand(b, hkv, upto))
    order = order[..., :n_union]  # a KV head with fewer: slot 0, unused
    flat = idx.reshape(b, hkv, -1)
    renumbered = rank.gather(-1, flat.clamp(min=0)).masked_fill(flat < 0, -1).view(idx.shape)
    return gather_slots(keys, order), gather_slots(values, order), renumbered, n_union


def topk_slots(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best slots along the last axis, in no particular order; -inf scores never count
    (returned as -1)."""
    k = min(k, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    return idx.masked_fill(torch.isneginf(vals), -1)


def mean_count(counts: torch.Tensor) -> torch.Tensor:
    """The mean of integer counts as a float64 scalar on the device (float32 mean, as the statistics always were)."""
    return counts.float().mean().double()


def selected_slots(idx: torch.Tensor, n_slots: int) -> torch.Tensor:
    """``[B,Hkv,n_slots]`` bool: the slots any entry of ``idx`` (``[B,Hkv,...]``, -1 pads) selects."""
    b, hkv = idx.shape[:2]
    hit = torch.zeros(b, hkv, n_slots + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(-1, idx.reshape(b, hkv, -1).clamp(min=-1) + 1, True)  # -1 pads land in column 0, dropped
    return hit[..., 1:]


def union_count(idx: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Distinct valid slots per ``[B,Hkv]`` over the G and k axes of ``idx`` ``[B,Hkv,G,k]``."""
    return selected_slots(idx, n_slots).sum(-1)


_SCORED_WINDOWS: dict[int, dict] = {}  # id(q_window) -> its scores per (keys, prompt_len, window, scaling)


def window_scores(q_window: torch.Tensor, keys: torch.Tensor, prompt_len: int, window: int,
                  scaling: float) -> torch.Tensor:
    """SnapKV scores ``[B,Hkv,g,L-w]``: post-softmax attention of the last ``w`` prompt queries, summed over them.

    Remembered for as long as ``q_window`` lives: a grid's cells all score the queries one shared prefill
    captured (the same tensor), so the scores are computed once per layer and window, not once per cell.
    Callers must not modify the result in place."""
    memo = _SCORED_WINDOWS.get(id(q_window))
    if memo is None:
        memo = _SCORED_WINDOWS[id(q_window)] = {}
        weakref.finalize(q_window, _SCORED_WINDOWS.pop, id(q_window), None)
    key = (keys.data_ptr(), tuple(keys.shape), prompt_len, window, scaling)
    if key not in memo:
        memo[key] = _window_scores(q_window, keys, prompt_len, window, scaling)
    return memo[key]


def _window_scores(q_window, keys, prompt_len, window, scaling):
    q_win = q_window[..., -window:, :].float()
    k = keys[:, :, :prompt_len].float()
    logits = torch.einsum("bhgwd,bhsd->bhgws", q_win, k) * scaling
    q_pos = torch.arange(prompt_len - window, prompt_len, device=k.device)
    k_pos = torch.arange(prompt_len, device=k.device)
    logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=-2)[..., : prompt_len - window]


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


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

