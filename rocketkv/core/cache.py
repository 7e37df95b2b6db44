"""Per-layer KV storage in statically shaped buffers that evicts in place and carries a method's metadata.

Keys are stored post-RoPE, once per KV head, in buffers of a fixed capacity ``C``: ``keys``/``values`` are
``[B, Hkv, C, d]`` and ``positions`` ``[B, Hkv, C]`` (each slot's original token position, so eviction never
renumbers tokens).  Slots ``[0, length)`` hold tokens; ``length`` and ``seen_t`` (tokens seen, the next token's
position) are device counters that a decode step advances in place, so the same step can be replayed as a CUDA
graph.  ``stored`` and ``seen`` are their host mirrors, kept by eager code and by the graph runner
(``GenerationState.advance``).  ``visible`` (``[B, Hkv, g, C]`` or None) marks the slots each query head of a group
may attend to, for methods that select per query head.

The capacity is the prompt's slots kept after compression plus the planned decode steps (``reserve``); an eager
decode that runs past it grows the buffers.

What a method may use (the rest is the session's): ``keys``, ``values``, ``positions``, ``visible``, ``length``
and ``stored`` to read; ``slot_index`` (``arange(C)``); ``keep(slots, visible)`` to evict; ``meta``, a dict of the
method's own metadata (its tensors count as metadata bytes, and ``keep`` clears it); ``track_history()`` to keep
every token beside the working set.

Multi-turn: the buffers above are the *working set* a decode step reads.  A method that calls ``track_history()``
in its ``compress`` (RocketKV-MT) makes the layer also keep the whole history, every token seen in position order,
in two more buffers (``history_keys``/``history_values``, ``[B, Hkv, H, d]``, K/V once per KV head; slot ``j`` holds
position ``j``, so ``seen_t`` counts their slots).  Every later token is written to both.  ``begin_turn`` (the
session's ``next_turn``) then hands the history back as the working set, uncompressed, so the new turn's prefill
compresses the whole history again; a layer that tracks nothing keeps its compressed working set across turns and
only makes room for the turn.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_SPARE = 16


def gather_slots(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``t[b, h, slots[b, h, i]]`` as ``[B, H, m, ...]`` for ``t`` ``[B, H, S, ...]`` and in-range ``slots``
    ``[B, H, m]``: one row copy per slot (``index_select`` over the slot rows), several times faster on CPU than
    ``torch.gather`` with an index expanded over the trailing axes."""
    return gather_slots_of((t,), slots)[0]


def gather_slots_of(tensors: tuple[torch.Tensor, ...], slots: torch.Tensor) -> list[torch.Tensor]:
    """``gather_slots`` of each tensor (K and V of a layer): the row index is built once for tensors alike in
    layout."""
    out, index, layout = [], None, None
    for t in tensors:
        b, h, n = t.shape[:3]
        width = math.prod(t.shape[3:])
        rows_aligned = t.stride(2) == width and t.stride(0) % width == 0 and t.stride(1) % width == 0
        if not (rows_aligned and t[:1, :1, :1].is_contiguous()):
            t = t.contiguous()
        span = ((b - 1) * t.stride(0) + (h - 1) * t.stride(1)) // width + n  # slot rows from the first to the last
        rows = t.as_strided((span, width), (width, 1), t.storage_offset())
        if layout != (b, h, t.stride(0) // width, t.stride(1) // width):
            layout = (b, h, t.stride(0) // width, t.stride(1) // width)
            index = (slots + _first_rows(*layout, t.device)).reshape(-1)
        out.append(rows.index_select(0, index).view(b, h, slots.shape[-1], *t.shape[3:]))
    return out


@functools.lru_cache(maxsize=256)
def _first_rows(b: int, h: int, batch_rows: int, head_rows: int, device: torch.device) -> torch.Tensor:
    """``[B, H, 1]``: the row of each (batch, head)'s first slot in ``gather_slots``'s row view.  Cached: a decode
    step gathers with the same few layouts in every layer, and building them costs more than the gather."""
    return (torch.arange(b, device=device)[:, None] * batch_rows + torch.arange(h, device=device) * head_rows)[..., None]


class CompressedLayer(DynamicLayer):
    def __init__(self, state: Any, layer_idx: int):
        super().__init__()
        self.state = state  # the generation this layer belongs to (method, plan, statistics)
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None
        self.length: torch.Tensor | None = None
        self.seen_t: torch.Tensor | None = None
        self.slot_index: torch.Tensor | None = None
        self.meta: dict[str, Any] = {}
        self.stored = 0
        self.seen = 0
        self.decoded: tuple = ()  # (first, stop) ranges of the slot counts its decode steps saw (DecodeStats)
        self.compressed = False
        self.kept_after_prefill: float | None = None
        self.captured_q: torch.Tensor | None = None  # last prefill queries, kept for a grid's shared prefill
        self.captured_scaling: float | None = None
        self._borrowed = False  # the buffers are a shared prefill's (or the history's): read them, never write them
        self.history_keys: torch.Tensor | None = None  # every token seen, in position order (``track_history``)
        self.history_values: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.positions is None else self.positions.shape[2]

    def _spare(self) -> int:
        return max(getattr(self.state, "max_new_tokens", 0) or 0, MIN_SPARE)

    def _allocate(self, template_k: torch.Tensor, template_v: torch.Tensor, capacity: int) -> None:
        b, h = template_k.shape[:2]
        device = template_k.device
        # zeros, not empty: slots past ``length`` are read under masks, and garbage there could be NaN
        self.keys = template_k.new_zeros(b, h, capacity, template_k.shape[-1])
        self.values = template_v.new_zeros(b, h, capacity, template_v.shape[-1])
        self.positions = torch.full((b, h, capacity), -1, dtype=torch.long, device=device)
        self.slot_index = torch.arange(capacity, device=device)
        self._borrowed = False

    def _move_to(self, capacity: int) -> None:
        """Own buffers of ``capacity`` slots holding the stored ones (after the shared prefill, or to grow)."""
        keys, values, positions, visible, n = self.keys, self.values, self.positions, self.visible, self.stored
        self._allocate(keys, values, capacity)
        self.keys[:, :, :n], self.values[:, :, :n], self.positions[:, :, :n] = (t[:, :, :n]
                                                                               for t in (keys, values, positions))
        if visible is not None:
            self.visible = self._visible_with_room(visible[..., :n])

    def _visible_with_room(self, visible: torch.Tensor) -> torch.Tensor:
        """``visible`` of the stored slots, extended to the capacity: slots appended later are visible to all heads."""
        room = torch.ones(*visible.shape[:3], self.capacity, dtype=torch.bool, device=visible.device)
        room[..., :visible.shape[-1]] = visible
        return room

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._allocate(key_states, value_states, key_states.shape[2] + self._spare())
        self.length = torch.zeros((), dtype=torch.long, device=key_states.device)
        self.seen_t = torch.zeros((), dtype=torch.long, device=key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, n, _ = key_states.shape
        if self._borrowed or self.stored + n > self.capacity:
            self._move_to(self.stored + n + self._spare())
        new = self.slot_index[:n]
        slots = self.length + new
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.positions.index_copy_(2, slots, (self.seen_t + new).expand(b, h, n))
        if self.history_keys is not None:
            if self.seen + n > self.history_keys.shape[2]:
                self._grow_history(self.seen + n + self._spare())
            self.history_keys.index_copy_(2, self.seen_t + new, key_states)
            self.history_values.index_copy_(2, self.seen_t + new, value_states)
        self.length += n
        self.seen_t += n
        self.stored += n
        self.seen += n
        return self.keys, self.values

    def share(self, source: "CompressedLayer") -> None:
        """Start from ``source``'s stored slots (a fork of a grid's shared prefill).  They are read, never written:
        an eviction gathers new buffers, and ``reserve`` or the first append copies them into buffers of its own."""
        self.lazy_initialization(source.keys[:, :, :0], source.values[:, :, :0])
        self.keys, self.values, self.positions = source.keys, source.values, source.positions
        self.slot_index = source.slot_index
        self._borrowed = True
        self.length.fill_(source.stored)
        self.seen_t.fill_(source.seen)
        self.stored, self.seen = source.stored, source.seen

    def reserve(self, prompt_slots: int) -> None:
        """Buffers of this layer's own of ``prompt_slots`` + 1 + the planned decode steps: a decode as long as
        planned never reallocates (a CUDA graph replays into the same buffers).  The capacity depends only on the
        prompt's slots and the plan, so a fork of a shared prefill and a run of its own get the same buffers
        (the methods' top-k breaks ties by position in the buffer)."""
        capacity = prompt_slots + 1 + self._spare()
        if self._borrowed or capacity != self.capacity:
            self._move_to(capacity)
        if self.history_keys is not None and self.history_keys.shape[2] < self.seen + 1 + self._spare():
            self._grow_history(self.seen + 1 + self._spare())

    def track_history(self) -> None:
        """Keep every token from now on beside the working set (a method calls this in ``compress``, before it
        evicts, while the layer still holds every token seen).  The buffers as they are become the history (a
        shared prefill's are copied); the working set reads them until ``keep`` or ``reserve`` gives it its own."""
        if self.stored != self.seen:
            raise RuntimeError("track_history needs every token seen in the layer: call it before evicting")
        if self.history_keys is not None:
            return
        shared = self._borrowed
        self.history_keys = self.keys.clone() if shared else self.keys
        self.history_values = self.values.clone() if shared else self.values
        self._borrowed = True

    def _grow_history(self, capacity: int) -> None:
        for name in ("history_keys", "history_values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, :self.seen] = old[:, :, :self.seen]
            setattr(self, name, new)

    def begin_turn(self, room: int) -> None:
        """Before the next turn of a conversation feeds its tokens: a layer that tracks its history takes it back as
        the working set (every token, uncompressed: the turn's forward is a prefill again, and its method compresses
        the whole history afresh); any other layer keeps its compressed slots and decodes the turn's tokens one step
        at a time.  Either way its buffers get room for ``room`` more tokens, so the turn's decode never grows them."""
        if self.history_keys is not None:
            b, h = self.history_keys.shape[:2]
            self.keys, self.values = self.history_keys, self.history_values
            self.history_keys = self.history_values = None
            self.slot_index = torch.arange(self.keys.shape[2], device=self.keys.device)
            self.positions = torch.where(self.slot_index < self.seen, self.slot_index, -1).expand(b, h, -1).clone()
            self.visible = None
            self.meta = {}
            self.stored = self.seen
            self.length.fill_(self.seen)
            self.compressed = False
            self._borrowed = False
        if self.stored + room > self.capacity:
            self._move_to(self.stored + room + MIN_SPARE)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def keep(self, slots: torch.Tensor, visible: torch.Tensor | None = None) -> None:
        """Keep only ``slots`` (``[B, Hkv, m]``, ascending, each below ``stored``) of every head; the rest is freed,
        not masked.  ``visible`` (``[B, Hkv, g, m]``) says which kept slots each query head may attend to."""
        kept = [gather_slots(t[:, :, :self.stored], slots) for t in (self.keys, self.values, self.positions)]
        m = slots.shape[-1]
        self.stored = m
        self._allocate(kept[0], kept[1], m + self._spare())
        self.keys[:, :, :m], self.values[:, :, :m], self.positions[:, :, :m] = kept
        self.length.fill_(m)
        self.visible = None if visible is None else self._visible_with_room(visible)
        self.meta = {}

    def kv_bytes(self) -> int:
        """Bytes of the stored K/V slots."""
        if self.keys is None or not self.is_initialized:
            return 0
        per_slot = self.keys[:, :, :1].numel() * self.keys.element_size() \
            + self.values[:, :, :1].numel() * self.values.element_size()
        history = 0 if self.history_keys is None else self.seen
        return per_slot * (self.stored + history)

    def meta_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.meta.values() if isinstance(t, torch.Tensor))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (no assisted/speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with a compressed KV cache; use greedy decoding")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("num_return_sequences > 1 is not supported with a compressed KV cache")


class CompressedCache(DynamicCache):
    """The cache a session hands the model: a ``DynamicCache`` of ``CompressedLayer``s whose ``update`` a compiled
    decode step (``method.compile``) runs eagerly, as one call: it keeps host counts, and traced it would be compiled
    once per layer index."""

    @torch.compiler.disable
    def update(self, *args, **kwargs):
        return super().update(*args, **kwargs)
