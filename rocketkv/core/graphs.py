"""Greedy decode steps from static inputs, run eagerly or captured once as a CUDA graph and replayed.

An eager decode step of an 8B model at batch 1 is launch-bound: hundreds of small kernels per layer, each launched
from Python.  Every method's step has static shapes (``CompressedLayer``'s buffers, fixed selection sizes, page
tables sized for the buffer) and keeps its counters on the device, so the whole forward of one token — the model's
layers, each method's selection and attention, the statistics and the greedy choice — can be recorded once and
replayed.  Host state the replay does not run (the layers' host mirrors, the step count) catches up through
``GenerationState.advance``.
"""
from __future__ import annotations

import time

import torch

GRAPH_MODES = ("auto", "on", "off")
# RoPE types whose frequencies transformers recomputes from the sequence length read on the host in every forward
# (``dynamic_rope_update``): a captured step would replay the first step's frequencies.
HOST_SYNCED_ROPE = ("dynamic", "longrope")


def rope_types(config) -> set[str]:
    """The RoPE types of a transformers config (``rope_parameters``, or per layer type a dict of them)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)] if isinstance(params, dict) else []
    return {p.get("rope_type", p.get("type", "default")) for p in (nested or [params]) if isinstance(p, dict)}


def use_cuda_graphs(mode: str, device: torch.device, rope: set[str] | tuple = ()) -> bool:
    """``method.cuda_graphs``: "auto" captures on CUDA; "on" insists (an error elsewhere); "off" never does.  A
    model whose RoPE (``rope``, from ``rope_types``) syncs on the host decodes eagerly under "auto"."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"cuda_graphs={mode!r} is not valid; use auto, on or off")
    if mode == "on" and device.type != "cuda":
        raise ValueError(f"cuda_graphs=on needs a CUDA device, and the model is on {device}; use auto or off")
    host_synced = sorted(set(rope) & set(HOST_SYNCED_ROPE))
    if mode == "on" and host_synced:
        raise ValueError(f"cuda_graphs=on cannot capture this model's rope_type={host_synced[0]}: transformers "
                         f"recomputes its frequencies from a length read on the host every step; use "
                         f"cuda_graphs=auto or off (eager decode)")
    return mode != "off" and device.type == "cuda" and not host_synced


class DecodeStep:
    """Feeds one token per row into ``cache`` and returns each row's greedy next token (a device tensor).

    Inputs live in static buffers: the fed tokens, their positions (the tokens seen so far) and the greedy
    output; the step advances the positions itself, on the device.  With ``graphs`` the first ``warmup`` steps
    run eagerly on a side stream (kernel compilation, allocator and library set-up), the next one is captured and
    every step from then on replays the graph.  ``setup_seconds`` is the time of those first steps."""

    def __init__(self, model, cache, cache_kwarg: str, graphs: bool = False, warmup: int = 2):
        layer = cache.layers[0]
        batch, device = layer.keys.shape[0], layer.keys.device
        self.model, self.cache, self.cache_kwarg = model, cache, cache_kwarg
        self.state = layer.state
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.full((1,), layer.seen, dtype=torch.long, device=device)
        self.position_ids = self.cache_position.expand(batch, 1)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.graphs, self.warmup = graphs, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        self.setup_seconds = 0.0
        self.setup_steps = 0

    def _forward(self) -> None:
        logits = self.model(input_ids=self.tokens, position_ids=self.position_ids, cache_position=self.cache_position,
                            use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.cache}).logits[:, -1]
        self.next_tokens.copy_(logits.argmax(-1))
        self.cache_position += 1

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens[:, 0].copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            self.state.advance(1)
        elif self.graphs:
            start = time.perf_counter()
            self._setup_step()
            torch.cuda.synchronize(self.tokens.device)
            self.setup_seconds += time.perf_counter() - start
            self.setup_steps += 1
        else:
            self._forward()
        self.steps += 1
        return self.next_tokens

    def _setup_step(self) -> None:
        if self.steps < self.warmup:
            side = torch.cuda.Stream(self.tokens.device)
            side.wait_stream(torch.cuda.current_stream(self.tokens.device))
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream(self.tokens.device).wait_stream(side)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the step's kernels; nothing runs on the device yet
            self._forward()
        self.state.advance(-1)  # the capture ran the step's host bookkeeping once, the replay below counts it
        self.graph = graph
        graph.replay()
        self.state.advance(1)
