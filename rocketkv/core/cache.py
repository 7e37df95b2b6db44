"""Per-layer KV storage that evicts in place and carries a method's metadata.

Keys are stored post-RoPE, once per KV head: ``keys``/``values`` are ``[B, Hkv, S, d]``.  ``positions``
(``[B, Hkv, S]``) keeps each stored token's original position, so eviction never renumbers tokens and
``get_seq_length()`` reports tokens seen, not tokens stored.  ``visible`` (``[B, Hkv, g, S]`` or None) marks
which stored slots each query head of a group may attend to, for methods that select per query head.

What a method may use (the rest is the session's): ``keys``, ``values``, ``positions``, ``visible`` and
``stored`` to read; ``keep(slots, visible)`` to evict; ``meta``, a dict of the method's own metadata (its
tensors count as metadata bytes, and ``keep`` clears it).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


def gather_slots(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``t[b, h, slots[b, h, i]]`` as ``[B, H, m, ...]`` for ``t`` ``[B, H, S, ...]`` and in-range ``slots``
    ``[B, H, m]``: one row copy per slot (``index_select`` over the slot rows), several times faster on CPU than
    ``torch.gather`` with an index expanded over the trailing axes."""
    b, h, n = t.shape[:3]
    width = math.prod(t.shape[3:])
    rows_aligned = t.stride(2) == width and t.stride(0) % width == 0 and t.stride(1) % width == 0
    if not (rows_aligned and t[:1, :1, :1].is_contiguous()):
        t = t.contiguous()
    span = ((b - 1) * t.stride(0) + (h - 1) * t.stride(1)) // width + n  # slot rows from the first to the last
    rows = t.as_strided((span, width), (width, 1), t.storage_offset())
    first_row = (torch.arange(b, device=t.device)[:, None] * t.stride(0)
                 + torch.arange(h, device=t.device) * t.stride(1)) // width
    picked = rows.index_select(0, (slots + first_row[..., None]).reshape(-1))
    return picked.view(b, h, slots.shape[-1], *t.shape[3:])


class CompressedLayer(DynamicLayer):
    def __init__(self, state: Any, layer_idx: int):
        super().__init__()
        self.state = state  # the generation this layer belongs to (method, plan, statistics)
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None
        self.meta: dict[str, Any] = {}
        self.seen = 0
        self.compressed = False
        self.kept_after_prefill: float | None = None
        self.captured_q: torch.Tensor | None = None  # last prefill queries, kept for a grid's shared prefill
        self.captured_scaling: float | None = None
        self._room: tuple[torch.Tensor, ...] | None = None  # (keys, values, positions) buffers with spare slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.keys = key_states.new_empty(b, h, 0, key_states.shape[-1])
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.positions = torch.empty(b, h, 0, dtype=torch.long, device=key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, n, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + n, device=key_states.device).expand(b, h, n)
        self.keys, self.values, self.positions = self._append(n, key_states, value_states, new_pos)
        if self.visible is not None:
            ones = torch.ones(*self.visible.shape[:3], n, dtype=torch.bool, device=self.visible.device)
            self.visible = torch.cat([self.visible, ones], dim=-1)
        self.seen += n
        return self.keys, self.values

    def _append(self, n: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Keys, values and positions with ``new`` appended, as views of buffers with room for the decode steps
        ahead, so a step copies only its own token (``cat`` would copy the whole cache).  The buffers are
        (re)allocated when the slots are not theirs (after an eviction, in a fork) or when they are full."""
        current = (self.keys, self.values, self.positions)
        stored = current[0].shape[2]
        room = self._room
        owned = room is not None and all(c.data_ptr() == r.data_ptr() for c, r in zip(current, room))
        if not owned or stored + n > room[0].shape[2]:
            spare = max(getattr(self.state, "max_new_tokens", 0) or 0, 16)
            room = self._room = tuple(c.new_empty(*c.shape[:2], stored + n + spare, *c.shape[3:]) for c in current)
            for r, c in zip(room, current):
                r[:, :, :stored] = c
        for r, x in zip(room, new):
            r[:, :, stored:stored + n] = x
        return [r[:, :, :stored + n] for r in room]

    def share(self, source: "CompressedLayer") -> None:
        """Start from ``source``'s stored slots (a fork of a grid's shared prefill).  They are read, never written:
        an eviction gathers new tensors and the first append copies them into buffers of this layer's own."""
        self.lazy_initialization(source.keys, source.values)
        self.keys, self.values, self.positions = source.keys, source.values, source.positions
        self.seen = source.seen

    @property
    def stored(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def keep(self, slots: torch.Tensor, visible: torch.Tensor | None = None) -> None:
        """Keep only ``slots`` (``[B, Hkv, m]``, ascending) of every head; the rest is freed, not masked.
        ``visible`` (``[B, Hkv, g, m]``) says which kept slots each query head may attend to."""
        self.keys, self.values, self.positions = (gather_slots(t, slots)
                                                  for t in (self.keys, self.values, self.positions))
        self.visible = visible
        self.meta = {}

    def kv_bytes(self) -> int:
        """Bytes of the stored K/V slots."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def meta_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.meta.values() if isinstance(t, torch.Tensor))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (no assisted/speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with a compressed KV cache; use greedy decoding")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("num_return_sequences > 1 is not supported with a compressed KV cache")
