"""What the layers of one compressed cache share: the method, this sample's plan and the decode statistics."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rocketkv.core.methods import Method, StepCost
from rocketkv.core.methods.full import FullKV


@dataclass
class DecodeStats:
    """Running totals over the decode steps of one generation.  The per-layer counts may be device scalars: they
    are summed where they live and read on the host once, in ``summary``, so a GPU decode is never stalled."""

    steps: int = 0
    attended: float | torch.Tensor = 0.0
    elements: float | torch.Tensor = 0.0

    def record(self, layer_idx: int, cost: StepCost) -> None:
        if layer_idx == 0:
            self.steps += 1
        self.attended = self.attended + cost.attended
        self.elements = self.elements + cost.elements

    def summary(self, layers: list, element_size: int) -> dict:
        n_layers = max(1, len(layers))
        steps = max(1, self.steps)
        kept = [l.kept_after_prefill for l in layers if l.kept_after_prefill is not None]
        elements = float(self.elements)
        return {
            "kept_tokens": sum(kept) / len(kept) if kept else 0.0,
            "attended_tokens": float(self.attended) / (steps * n_layers),
            "elements_read_per_step": elements / steps,
            "bytes_read_per_step": elements * element_size / steps,
            "stored_kv_bytes": float(sum(l.kv_bytes() for l in layers)),
            "metadata_bytes": float(sum(l.meta_bytes() for l in layers)),
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

    def summary(self) -> dict:
        return self.stats.summary(self.layers, self.element_size)
