"""What the layers of one compressed cache share: the method, this sample's plan and the decode statistics."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rocketkv.core.methods import Method, StepCost
from rocketkv.core.methods.full import FullKV


@dataclass
class DecodeStats:
    """Running totals over the decode steps of one generation.  The per-layer counts are device scalars added in
    place into device totals (so a replayed CUDA graph keeps adding) and read on the host once, in ``summary``: a
    GPU decode is never stalled.  ``steps`` is counted on the host (``GenerationState.advance`` for replays)."""

    steps: int = 0
    attended: torch.Tensor | None = None
    elements: torch.Tensor | None = None

    def record(self, layer_idx: int, cost: StepCost, device: torch.device) -> None:
        if layer_idx == 0:
            self.steps += 1
        if self.attended is None:
            self.attended = torch.zeros((), dtype=torch.float64, device=device)
            self.elements = torch.zeros((), dtype=torch.float64, device=device)
        self.attended.add_(cost.attended)
        self.elements.add_(cost.elements)

    def summary(self, layers: list, element_size: int, metadata_bytes: int) -> dict:
        n_layers = max(1, len(layers))
        steps = max(1, self.steps)
        kept = [l.kept_after_prefill for l in layers if l.kept_after_prefill is not None]
        elements = 0.0 if self.elements is None else float(self.elements)
        attended = 0.0 if self.attended is None else float(self.attended)
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
            layer.stored += n_tokens
            layer.seen += n_tokens

    def summary(self) -> dict:
        meta = sum(self.method_for(l.layer_idx).metadata_bytes(l, self.plan) for l in self.layers)
        return self.stats.summary(self.layers, self.element_size, meta)
