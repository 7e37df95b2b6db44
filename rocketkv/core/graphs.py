"""Greedy decode steps from static inputs, run eagerly or captured once as a CUDA graph and replayed.

An eager decode step of an 8B model at batch 1 is launch-bound: hundreds of small kernels per layer, each launched
from Python.  Every method's step has static shapes (``CompressedLayer``'s buffers, fixed selection sizes, page
tables sized for the buffer) and keeps its counters on the device, so the whole forward of one token — the model's
layers, each method's selection and attention, the statistics and the greedy choice — can be recorded once and
replayed.  Host state the replay does not run (the layers' host mirrors, the step count) catches up through
``GenerationState.advance``.

At batch 1 the model's own small ops (RMSNorm, RoPE, SwiGLU, residual adds: some 30 kernels per layer) cost about
as much as the K/V a method saves.  ``method.compile`` runs the decoder layers through ``torch.compile`` (inductor
fuses them; inside our CUDA graph on CUDA).  The cache update and the attention function stay eager (they are
``torch.compiler.disable``d: they keep the methods' host bookkeeping), so each layer compiles into two graphs
around them, one code for every layer: the norm, projections and RoPE before, and the output projection,
residuals, norm and MLP after.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
import weakref

import torch

GRAPH_MODES = ("auto", "on", "off")
# RoPE types whose frequencies transformers recomputes from the sequence length read on the host in every forward
# (``dynamic_rope_update``): a captured step would replay the first step's frequencies.
HOST_SYNCED_ROPE = ("dynamic", "longrope")
COMPILE_MODES = ("auto", "on", "off")
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


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


def use_compile(mode: str, device: torch.device) -> bool:
    """``method.compile``: "on" compiles the decoder layers of the decode step, "off" never; "auto" is off, as
    compiling has not been measured faster on CUDA yet, and on CPU it was slower (docs/efficiency.md)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r} is not valid; use auto, on or off")
    return mode == "on"


def compiled_layers(model) -> list[tuple[torch.nn.Module, object]]:
    """(decoder layer, its compiled forward) for every decoder layer; compiled once per layer and kept."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"compile=on: {type(model).__name__} has no decoder layers to compile; use compile=off")
    for layer in layers:
        if layer not in _COMPILED:
            _COMPILED[layer] = torch.compile(layer.forward)
    return [(layer, _COMPILED[layer]) for layer in layers]


@contextlib.contextmanager
def running(pairs: list[tuple[torch.nn.Module, object]] | None):
    """Within: each module runs its compiled forward (an instance attribute over the class's, removed after)."""
    if not pairs:
        yield
        return
    for module, forward in pairs:
        module.forward = forward
    try:
        # a layer's int attributes (its layer_idx) as inputs, not constants: one compiled graph serves every layer
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            yield
    finally:
        for module, _ in pairs:
            del module.forward


def graph_kernels(graph: torch.cuda.CUDAGraph) -> int | None:
    """The kernel nodes of a captured graph (one kernel launch each per replay); None when it cannot be read."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        handle, count = ctypes.c_void_p(graph.raw_cuda_graph()), ctypes.c_size_t(0)
        if driver.cuGraphGetNodes(handle, None, ctypes.byref(count)) != 0:
            return None
        nodes, kind = (ctypes.c_void_p * count.value)(), ctypes.c_int(-1)
        if driver.cuGraphGetNodes(handle, nodes, ctypes.byref(count)) != 0:
            return None
        kernels = 0
        for node in nodes:
            if driver.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)) != 0:
                return None
            kernels += kind.value == 0  # CU_GRAPH_NODE_TYPE_KERNEL
        return kernels
    except (OSError, AttributeError, RuntimeError):
        return None


class DecodeStep:
    """Feeds one token per row into ``cache`` and returns each row's greedy next token (a device tensor).

    Inputs live in static buffers: the fed tokens, their positions (the tokens seen so far) and the greedy
    output; the step advances the positions itself, on the device.  With ``graphs`` the first ``warmup`` steps
    run eagerly on a side stream (kernel compilation, allocator and library set-up), the next one is captured and
    every step from then on replays the graph.  ``setup_seconds`` is the time of those first steps;
    ``kernels_per_step`` the kernels the captured graph launches per replay (None until captured, or unread).
    ``compile`` runs the decoder layers compiled (``use_compile``); None takes the cache's method's option."""

    def __init__(self, model, cache, cache_kwarg: str, graphs: bool = False, warmup: int = 2,
                 compile: bool | None = None):
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
        self.kernels_per_step: int | None = None
        if compile is None:
            compile = use_compile(self.state.method.compile, device)
        self.compiled = compiled_layers(model) if compile else None

    def _forward(self) -> None:
        with running(self.compiled):
            logits = self.model(input_ids=self.tokens, position_ids=self.position_ids,
                                cache_position=self.cache_position, use_cache=True, logits_to_keep=1,
                                **{self.cache_kwarg: self.cache}).logits[:, -1]
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
        try:
            graph, kept = torch.cuda.CUDAGraph(keep_graph=True), True  # the graph kept to count its kernels
        except TypeError:  # a torch without keep_graph: no count
            graph, kept = torch.cuda.CUDAGraph(), False
        with torch.cuda.graph(graph):  # records the step's kernels; nothing runs on the device yet
            self._forward()
        self.state.advance(-1)  # the capture ran the step's host bookkeeping once, the replay below counts it
        if kept:
            self.kernels_per_step = graph_kernels(graph)
            graph.instantiate()
        self.graph = graph
        graph.replay()
        self.state.advance(1)
