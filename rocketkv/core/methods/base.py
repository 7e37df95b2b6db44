"""The contract every KV method implements.

A method is a small dataclass registered by name (``@register``), with its options as fields and one config
file, ``conf/method/<name>.yaml``.  It is built once per run (``make_method``) and holds no per-sample state:
what it needs for one sample lives in that sample's ``plan``, and what it keeps for one layer lives in that
layer's cache (``CompressedLayer``).  The session calls its hooks; nothing outside a method's own module
knows its name.

The hooks, in the order the session calls them for one sample:

``plan(prompt_len, max_new_tokens, head_dim, model_max_len, group_size) -> dict``
    Pure and cheap: the concrete parameters for this sample's lengths (selection sizes, page size, ...), all
    JSON-serialisable (every prediction records them).  Raise ``ValueError`` naming the budget and what would
    work when the budget cannot serve the sample.  ``plan["dense"] = True`` says the method keeps every token
    and attends to every stored slot at every step: the session then runs the sample as full KV, bit for bit.

``compress(layer, q_window, prompt_len, plan, scaling)``
    Once per layer, after the exact dense prefill of slots ``[0, prompt_len)``.  ``q_window``
    (``[B, Hkv, g, n, d]``, ``n >= window``) holds that prefill's last queries.  Evict with
    ``layer.keep(slots, visible)``; leave the layer alone to keep everything.

``index(layer, plan, upto)``
    Once with an int after ``compress`` (build the metadata of slots ``[0, upto)`` in ``layer.meta``), then
    before each decode step with a device ``upto``: fold in the newest slot, ``upto - 1``.

``decode(layer, q, upto, plan, scaling) -> (out, StepCost)``
    One decode step of one layer: ``q`` is ``[B, Hkv, g, d]`` (the g query heads of each KV head, so K/V are
    never repeated per query head); attend over stored slots ``[0, upto)`` and return ``[B, Hkv, g, d]`` and
    what the step read.  ``upto`` is a 0-dim device tensor and the layer's tensors are buffers of a fixed
    capacity (slots ``>= upto`` masked out): a step has static shapes and reads no host state, so it can be
    replayed as a CUDA graph.  It must not read tensors back to the host either (that stalls a GPU once per
    layer): what the plan and ``upto`` determine is ``StepCost.static`` (host arithmetic on slot counts, summed
    once per sample), data-dependent counts are one device scalar (``StepCost.count``).  Shape-dependent choices
    only: never branch on data.

``check_shape(num_layers, num_kv_heads)`` (optional)
    The model's shape, before anything runs (``rocketkv.compress`` and the runner's plan check): raise
    ``ValueError`` when the method's own data (a per-head pattern file) does not fit the model.

``metadata_bytes(layer, plan)`` (optional)
    The bytes of the method's metadata for the stored slots, when ``layer.meta`` holds room for more.

Conversations (``CompressionSession.next_turn``): a later turn's tokens are fed onto the carried cache.  By
default a layer keeps what its method kept and decodes them one step at a time with ``decode`` (a one-shot method
compresses at the first prefill only).  A method that calls ``layer.track_history()`` in ``compress`` (before it
evicts) has the layer keep every token beside its working set; each later turn is then a prefill again: dense
attention over the whole history, then ``compress`` over all of it (``prompt_len`` = the history, ``q_window`` =
the turn's queries, possibly fewer than ``window``), then ``index`` and decode steps on the new working set.

What a method may use of a layer: ``keys``, ``values`` (``[B, Hkv, S, d]``, keys post-RoPE), ``positions``
(original token positions), ``visible`` (per-head visibility or None), ``stored`` (S), ``keep(...)``,
``track_history()`` and ``meta`` (its own dict).  Shared building blocks (exact attention over selected slots, top-k, SnapKV window
scores, page min/max keys) are in ``rocketkv.core.methods.ops`` and ``rocketkv.core.methods.pages``.
``docs/adding-a-method.md`` walks through a new method end to end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rocketkv.core.cache import CompressedLayer
from rocketkv.core.graphs import COMPILE_MODES, GRAPH_MODES
from rocketkv.core.kernels import BACKENDS as KERNEL_BACKENDS
from rocketkv.core.methods.ops import StepCost, dense_decode

__all__ = ["METHODS", "MIN_BUDGET", "Method", "StepCost", "option_names", "register"]

METHODS: dict[str, type["Method"]] = {}

MIN_BUDGET = 16


def register(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls
    return cls


@dataclass
class Method:
    """Base class: dense attention over every stored slot, nothing evicted.

    ``budget`` is the paper's token budget ``t``: per KV group, K+V traffic of one decode step in
    token-equivalents, approximation traffic included.
    """

    budget: int | None = None
    window: int = 32
    decode_last_prompt_token: bool = True
    skip_layers: int = 0
    kernels: str = "auto"
    cuda_graphs: str = "auto"  # the harness's decode steps: replayed as a CUDA graph on CUDA (auto), always, never
    compile: str = "auto"  # the decode steps' decoder layers through torch.compile: on, off, auto (graphs.use_compile)
    extra: dict[str, Any] = field(default_factory=dict)

    name = ""
    uses_budget = True
    is_reference = False  # the dense baseline other methods are compared with (full KV)

    def __post_init__(self):
        if self.extra:
            raise ValueError(f"method {self.name!r}: unknown options {sorted(self.extra)}; valid: "
                             f"{sorted(option_names(type(self)))}")
        if self.uses_budget:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise ValueError(f"budget={self.budget!r} is not valid for method {self.name!r}: "
                                 f"give a positive integer number of tokens (>= {MIN_BUDGET})")
            if self.budget < MIN_BUDGET:
                raise ValueError(f"budget={self.budget} is below the minimum of {MIN_BUDGET} tokens "
                                 f"for method {self.name!r}")
        self._check_int_option("window", 1)
        self._check_int_option("skip_layers", 0)
        if self.kernels not in KERNEL_BACKENDS:
            valid = ", ".join(KERNEL_BACKENDS[:-1]) + f" or {KERNEL_BACKENDS[-1]}"
            raise ValueError(f"method {self.name!r}: kernels={self.kernels!r} is not valid; use {valid}")
        if self.cuda_graphs not in GRAPH_MODES:
            raise ValueError(f"method {self.name!r}: cuda_graphs={self.cuda_graphs!r} is not valid; use auto, on or off")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"method {self.name!r}: compile={self.compile!r} is not valid; use auto, on or off")

    def _check_int_option(self, option: str, least: int, why: str = "") -> None:
        """The option ``option`` must be an integer >= ``least`` (not a bool): else one error naming it and what is
        valid, with ``why`` after."""
        value = getattr(self, option)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"method {self.name!r}: {option}={value!r} is not valid; give an integer >= {least}{why}")

    def plan(self, prompt_len: int, max_new_tokens: int, head_dim: int, model_max_len: int | None = None,
             group_size: int = 1) -> dict:
        return {}

    def check_shape(self, num_layers: int, num_kv_heads: int) -> None:
        pass

    def compress(self, layer: CompressedLayer, q_window: torch.Tensor, prompt_len: int, plan: dict,
                 scaling: float) -> None:
        pass

    def index(self, layer: CompressedLayer, plan: dict, upto: int | torch.Tensor | None = None) -> None:
        pass

    def metadata_bytes(self, layer: CompressedLayer, plan: dict) -> int:
        """Bytes of this method's metadata for the layer's stored slots (the statistics' ``metadata_bytes``)."""
        return layer.meta_bytes()

    def decode(self, layer: CompressedLayer, q: torch.Tensor, upto: torch.Tensor, plan: dict,
               scaling: float) -> tuple[torch.Tensor, StepCost]:
        return dense_decode(layer, q, upto, scaling, self.kernels)


def option_names(cls: type[Method]) -> set[str]:
    return set(cls.__dataclass_fields__) - {"extra"}
