"""Per-layer KV storage that can evict in place and carries method metadata.

Keys are stored post-RoPE, once per KV head: ``keys``/``values`` are ``[B, Hkv, S, d]``.  ``positions``
(``[B, Hkv, S]``) keeps each stored token's original position, so eviction never renumbers tokens and
``get_seq_length()`` reports tokens seen, not tokens stored.  ``visible`` (``[B, Hkv, g, S]`` or None) marks
which stored slots each query head of a group may attend to, for methods that select per query head.

A layer forked from a grid's shared prefill (``share``) does not copy the prefill's slots: it reads them in place
and keeps only the slots it appends (its tail).  ``keys``/``values``/``positions`` stay contiguous
``[0, stored)`` tensors for the methods: the prefill's buffers have room after its slots, and the layer being
read lays its tail there first (``SharedSlots``).  Forks read one at a time (a batch's rows attend in turn), so
one room serves them all.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

_active = threading.local()


def active_layer() -> "CompressedLayer | None":
    """The layer whose ``update`` ran last in this thread: the one the next attention call reads."""
    return getattr(_active, "layer", None)


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


class SharedSlots:
    """A layer's stored slots lent to its forks: ``buffers`` (keys, values, positions) hold ``length`` slots and
    room after them, where the fork read last has laid its tail (``holder``: that fork and its tail's version)."""

    def __init__(self, buffers: tuple[torch.Tensor, ...], length: int):
        self.buffers = buffers
        self.length = length
        self.holder: tuple[object, int] | None = None

    @property
    def room(self) -> int:
        return self.buffers[0].shape[2] - self.length


class CompressedLayer(DynamicLayer):
    def __init__(self, state: Any, layer_idx: int):
        self._shared: SharedSlots | None = None  # set by ``share``: the slots before the tail are read in place
        self._tail: tuple[torch.Tensor, ...] | None = None  # (keys, values, positions) appended since, with room
        self._tail_len = 0
        self._tail_version = 0
        self._token = object()  # this layer, as a ``SharedSlots.holder`` (no reference cycle)
        self._lent: SharedSlots | None = None  # this layer's own slots, as lent to its forks
        self._own: list[torch.Tensor | None] = [None, None, None]  # keys, values, positions when not shared
        super().__init__()
        self.state = state  # per-generation state shared by all layers (plan, method, statistics)
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None
        self.meta: dict[str, Any] = {}
        self.seen = 0
        self.compressed = False
        self.n_indexed = 0  # slots covered by method metadata (pages)
        self.kept_after_prefill: float | None = None
        self.captured_q: torch.Tensor | None = None  # last prefill queries, kept for a shared-prefill grid
        self.captured_scaling: float | None = None
        self._buffers: tuple[torch.Tensor, ...] | None = None  # (keys, values, positions) with spare slots

    # keys, values and positions: own tensors, or in a shared layer views of the lender's buffers (tail laid in)
    keys = property(lambda self: self._slots(0), lambda self, v: self._set_own(0, v))
    values = property(lambda self: self._slots(1), lambda self, v: self._set_own(1, v))
    positions = property(lambda self: self._slots(2), lambda self, v: self._set_own(2, v))

    def _slots(self, i: int):
        if self._shared is None:
            return self._own[i]
        shared = self._shared
        stamp = (self._token, self._tail_version)
        if shared.holder != stamp:
            end = shared.length + self._tail_len
            with torch.inference_mode():  # the buffers come from a prefill under inference mode; reads may not
                for buffer, tail in zip(shared.buffers, self._tail or ()):
                    buffer[:, :, shared.length:end] = tail[:, :, :self._tail_len]
            shared.holder = stamp
            self._views = tuple(buffer[:, :, :end] for buffer in shared.buffers)
        return self._views[i]

    def _set_own(self, i: int, value) -> None:
        self._detach()
        self._own[i] = value

    def _detach(self) -> None:
        """Stop sharing: copy the slots read in place into tensors of this layer's own."""
        if self._shared is not None:
            own = [t.clone() for t in (self._slots(0), self._slots(1), self._slots(2))]
            self._shared = self._tail = None
            self._own = own

    def share(self, source: "CompressedLayer") -> None:
        """Read ``source``'s stored slots in place (a fork of a shared prefill): no copy, only later slots are own.
        ``source`` must not append afterwards without first reallocating (``_append`` sees it has lent them)."""
        if source._lent is None or source._lent.length != source.stored:
            source._lent = SharedSlots(source._buffers_with_room(), source.stored)
            source._buffers = None  # a later append by the source itself must not write into the forks' room
        self.lazy_initialization(source.keys, source.values)
        self._shared, self._tail, self._tail_len = source._lent, None, 0
        self._tail_version += 1
        self.seen = source.seen

    def _buffers_with_room(self) -> tuple[torch.Tensor, ...]:
        """This layer's (keys, values, positions) buffers with spare slots after the stored ones."""
        current = (self.keys, self.values, self.positions)
        return self._backing(current) or self._allocate(current, self.stored + self._spare())

    def _backing(self, current) -> tuple[torch.Tensor, ...] | None:
        """The buffers ``current`` (keys, values, positions) are views of, or None after a slot axis was replaced
        (eviction, a fork) or the buffers were lent."""
        room = self._buffers
        if room is not None and all(v.data_ptr() == r.data_ptr() and v.stride() == r.stride()
                                    for v, r in zip(current, room)):
            return room
        return None

    def _spare(self) -> int:
        """Slots of room a buffer keeps after the stored ones: the decode steps ahead; a grid's shared prefill keeps
        room for a fork's tail, the slots a decode keeps plus a verified draft."""
        spare = max(getattr(self.state, "max_new_tokens", 0) or 0, 16)
        return spare * 2 if getattr(self.state, "capture_window", 0) else spare

    @staticmethod
    def _allocate(current, capacity: int) -> tuple[torch.Tensor, ...]:
        stored = current[0].shape[2]
        room = tuple(v.new_empty(*v.shape[:2], capacity, *v.shape[3:]) for v in current)
        for r, v in zip(room, current):
            r[:, :, :stored] = v
        return room

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
        if self._shared is not None and self._tail_len + n <= self._shared.room:
            self._append_tail(n, key_states, value_states, new_pos)
        else:
            self._detach()  # a shared layer whose tail outgrew the lender's room: own copies from here on
            self.keys, self.values, self.positions = self._append(n, key_states, value_states, new_pos)
        if self.visible is not None:
            ones = torch.ones(*self.visible.shape[:3], n, dtype=torch.bool, device=self.visible.device)
            self.visible = torch.cat([self.visible, ones], dim=-1)
        self.seen += n
        _active.layer = self
        return self.keys, self.values

    def _append(self, n: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Keys, values and positions with ``new`` appended along the slot axis, as views of buffers with room
        for the decode steps ahead, so a step copies only its own token (not the whole cache, as ``cat`` does).
        A buffer is (re)allocated when a slot axis was replaced (eviction, a fork) or is full."""
        current = (self.keys, self.values, self.positions)
        stored = current[0].shape[2]
        room = self._backing(current)
        if room is None or stored + n > room[0].shape[2]:
            room = self._buffers = self._allocate(current, stored + n + self._spare())
        for r, x in zip(room, new):
            r[:, :, stored:stored + n] = x
        return [r[:, :, :stored + n] for r in room]

    def _append_tail(self, n: int, *new: torch.Tensor) -> None:
        tail, used = self._tail, self._tail_len
        if tail is None or used + n > tail[0].shape[2]:
            grown = tuple(x.new_empty(*x.shape[:2], used + n + self._spare(), *x.shape[3:]) for x in new)
            for g, t in zip(grown, tail or ()):
                g[:, :, :used] = t[:, :, :used]
            tail = self._tail = grown
        for t, x in zip(tail, new):
            t[:, :, used:used + n] = x
        self._tail_len += n
        self._tail_version += 1

    @property
    def stored(self) -> int:
        if self._shared is not None:
            return self._shared.length + self._tail_len
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def keep(self, slots: torch.Tensor, visible: torch.Tensor | None = None) -> None:
        """Keep only ``slots`` (``[B, Hkv, m]``, ascending) of every head; the rest is freed, not masked."""
        kept = tuple(gather_slots(t, slots) for t in (self.keys, self.values, self.positions))
        self._shared = self._tail = None  # the gathered slots are this layer's own
        self.keys, self.values, self.positions = kept
        self.visible = visible
        self.meta = {}
        self.n_indexed = 0

    def drop_newest(self, n: int) -> None:
        """Forget the ``n`` most recently appended slots (draft tokens that verification rejected); their
        buffer room is reused by the next append."""
        if n <= 0:
            return
        keep = self.stored - n
        if self._shared is not None and n > self._tail_len:
            self._detach()  # dropping shared slots too: only an own copy can shrink past the tail
        if self._shared is not None:
            self._tail_len -= n
            self._tail_version += 1
        else:
            self.keys, self.values, self.positions = (t[:, :, :keep] for t in (self.keys, self.values, self.positions))
        if self.visible is not None:
            self.visible = self.visible[..., :keep]
        self.seen -= n
        self.n_indexed = min(self.n_indexed, keep)

    def shared_bytes(self) -> int:
        """Bytes of the lender's slots this layer reads in place (keys, values, positions): what a copy would hold."""
        if self._shared is None:
            return 0
        return sum(b[:, :, :self._shared.length].numel() * b.element_size() for b in self._shared.buffers)

    def kv_bytes(self) -> int:
        """Bytes of the stored K/V slots, shared ones included (what a run of this layer's method stores)."""
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


class RowStackLayer(DynamicLayer):
    """One layer of several compressed caches decoded as the rows of one batch (the cells of a grid).

    Every row keeps its own ``CompressedLayer`` (method, plan, evictions, statistics, token positions); all rows
    come from one prompt.  ``update`` hands each row its slice of the new K/V; the attention function then attends
    row by row through each row's method.  Rows that advance together share positions (``get_seq_length`` reads
    the first row's); a caller whose rows stand at different positions passes ``position_ids`` per row.

    With ``widths`` the rows are packed instead: the batch is one sequence holding ``widths[0]`` tokens of the first
    row, then ``widths[1]`` of the second, and so on, each at its own positions (``position_ids``).  Rows fed
    different numbers of tokens then cost no padding in the projections.
    """

    def __init__(self, rows: list[CompressedLayer], widths: list[int] | None = None):
        super().__init__()
        self.rows = rows
        self.widths = widths
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.widths is not None:
            if key_states.shape[0] != 1 or key_states.shape[2] != sum(self.widths):
                raise ValueError(f"packed rows of {self.widths} tokens need one sequence of {sum(self.widths)}, "
                                 f"got {tuple(key_states.shape[:3:2])} (batch, tokens)")
            for row, k, v in zip(self.rows, key_states.split(self.widths, dim=2),
                                 value_states.split(self.widths, dim=2)):
                row.update(k, v)
        elif key_states.shape[0] != len(self.rows):
            raise ValueError(f"a batch of {key_states.shape[0]} rows was fed to a cache of {len(self.rows)} rows")
        else:
            for i, row in enumerate(self.rows):
                row.update(key_states[i:i + 1], value_states[i:i + 1])
        self.keys, self.values = key_states, value_states  # the attention call recognises its layer by these
        _active.layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.rows[0].seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(row.stored for row in self.rows) + query_length, 0
