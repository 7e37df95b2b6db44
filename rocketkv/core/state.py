"""What the layers of one compressed cache share: the method, this sample's plan and the decode statistics."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rocketkv.core.methods import Method, StepCost
from rocketkv.core.methods.full import FullKV


def add_steps(runs: tuple, upto: int, n: int) -> tuple:
    """``runs`` (``(first, stop)`` ranges of the slot counts decoded) with ``n`` more steps from ``upto`` on, or
    ``-n`` fewer at the end (n < 0).  Tuples, never changed in place: a replay's emulation restores host state."""
    if n < 0:
        first, stop = runs[-1]
        return runs[:-1] + (((first, stop + n),) if stop + n > first else ())
    if runs and runs[-1][1] == upto:
        return runs[:-1] + ((runs[-1][0], upto + n),)
    return runs + ((upto, upto + n),)


@dataclass
class DecodeStats:
    """Running totals over the decode steps of one generation.

    What the plan and the step's slot count determine is summed once, in ``summary``, from each layer's static
    cost and the slot counts it decoded (``layer.decoded``, kept on the host, and by ``GenerationState.advance``
    for replays).  Data-dependent counts are device scalars added in place, one op per layer, into a device vector
    of per-layer totals (so a replayed CUDA graph keeps adding) and read on the host once, in ``summary``: a GPU
    decode is never stalled.  ``steps`` is counted on the host."""

    steps: int = 0
    counts: torch.Tensor | None = None  # [layers] float64 on the device
    static: dict = field(default_factory=dict)  # layer -> its StepCost.static
    per_count: dict = field(default_factory=dict)  # layer -> (attended, elements) per unit of its count

    def record(self, layer, upto: int, cost: StepCost) -> None:
        """One decode step of ``layer`` over ``upto`` slots (its host count; the step itself used the device's)."""
        i = layer.layer_idx
        if i == 0:
            self.steps += 1
        layer.decoded = add_steps(layer.decoded, upto, 1)
        self.static[i] = cost.static
        if cost.count is not None:
            if self.counts is None:
                self.counts = torch.zeros(len(layer.state.layers) or i + 1, dtype=torch.float64,
                                          device=cost.count.device)
            self.counts[i].add_(cost.count)
            self.per_count[i] = cost.per_count

    def summary(self, layers: list, element_size: int, metadata_bytes: int) -> dict:
        n_layers = max(1, len(layers))
        steps = max(1, self.steps)
        kept = [l.kept_after_prefill for l in layers if l.kept_after_prefill is not None]
        attended = elements = 0.0
        for layer in layers:
            if layer.decoded and layer.layer_idx in self.static:
                uptos = torch.cat([torch.arange(a, b) for a, b in layer.decoded])
                a, e = self.static[layer.layer_idx](uptos).sum(0).tolist()
                attended, elements = attended + a, elements + e
        if self.counts is not None:
            counts = self.counts.tolist()
            for i, (per_attended, per_element) in self.per_count.items():
                attended, elements = attended + counts[i] * per_attended, elements + counts[i] * per_element
        return {
            "kept_tokens": sum(kept) / len(kept) if kept else 0.0,
            "attended_tokens": attended / (steps * n_layers),
            "elements_read_per_step": elements / steps,
            "bytes_read_per_step": elements * element_size / steps,
            "stored_kv_bytes": float(sum(l.kv_bytes() for l in layers)),
            "metadata_bytes": float(metadata_bytes),
            "decode_steps": self.steps,
        }


@dataclass
class GenerationState:
    method: Method
    max_new_tokens: int
    model_max_len: int | None
    plan: dict | None = None  # set by the caller, or planned at the prefill from the prompt's length
    prompt_len: int | None = None
    group_size: int = 1
    element_size: int = 4
    layers: list = field(default_factory=list)
    split_prefill: bool = True  # the first forward holds the whole prompt: its last token is decoded separately
    capture_window: int = 0  # keep this many last prefill queries per layer (a grid's shared prefill)
    stats: DecodeStats = field(default_factory=DecodeStats)
    dense: Method = field(default_factory=FullKV)

    def method_for(self, layer_idx: int) -> Method:
        """The method that runs ``layer_idx``: full KV for skipped layers and for samples the plan makes dense."""
        if layer_idx < self.method.skip_layers or (self.plan or {}).get("dense"):
            return self.dense
        return self.method

    def advance(self, n_tokens: int) -> None:
        """Host bookkeeping of ``n_tokens`` decode steps that ran without Python (replays of a captured step): the
        device counters advanced in the replay; their host mirrors and the step count catch up here."""
        self.stats.steps += n_tokens
        for layer in self.layers:
            layer.decoded = add_steps(layer.decoded, layer.stored + 1, n_tokens)
            layer.stored += n_tokens
            layer.seen += n_tokens

    def summary(self) -> dict:
        meta = sum(self.method_for(l.layer_idx).metadata_bytes(l, self.plan) for l in self.layers)
        return self.stats.summary(self.layers, self.element_size, meta)
