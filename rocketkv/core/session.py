"""``compress(model, method, budget)``: run a Hugging Face causal LM with a compressed KV cache.

Hooks into transformers through its seams only: the attention and mask functions of ``attention.py``,
registered under one name, and cache layers (``CompressedLayer``, a ``DynamicLayer`` subclass) placed in the
``Cache`` the forward pass receives.

The forward pass takes its cache as ``past_key_values`` up to transformers 5.23 and as ``cache`` from 5.24 on
(``past_key_values`` stays a deprecated alias, and ``generate`` passes ``cache``): ``cache_kwarg`` reads the name
from the model's ``forward`` signature, and the pre-forward hook looks under both.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from rocketkv.core.attention import ATTN_NAME, CACHE_KWARG, compress_layer
from rocketkv.core.cache import CompressedCache, CompressedLayer
from rocketkv.core.methods import Method, make_method
from rocketkv.core.state import GenerationState

LEGACY_CACHE_KWARG = "past_key_values"
DEFAULT_BUDGET = 256
_UNSET: Any = object()


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters  # follows the decorators' ``__wrapped__``
    return "cache" if "cache" in params else LEGACY_CACHE_KWARG


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes its ``Cache`` under: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return _cache_kwarg_of(type(model))


@dataclass(frozen=True)
class AttentionShape:
    """What a method's plan needs of a model: head dim, query heads per KV head, layers, KV heads."""

    head_dim: int
    group_size: int
    num_layers: int
    num_kv_heads: int = 1

    @classmethod
    def of(cls, model) -> "AttentionShape":
        cfg = model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return cls(head_dim, heads // kv_heads, cfg.num_hidden_layers, kv_heads)


class CompressionSession:
    """Returned by ``compress``: makes compressed caches for ``method``; ``stats()`` describes the latest one."""

    def __init__(self, model, method: Method, max_new_tokens: int | None = None, model_max_len: int | None = None):
        self.model = model
        self.method = method
        self.max_new_tokens = max_new_tokens
        self.model_max_len = model_max_len
        self.shape = AttentionShape.of(model)
        self.state: GenerationState | None = None

    def plan_for(self, prompt_len: int, max_new_tokens: int | None = None) -> dict:
        """The method's parameters for a prompt of ``prompt_len`` tokens (``Method.plan`` with this model's shape)."""
        return self.method.plan(prompt_len, max_new_tokens or self._max_new(), self.shape.head_dim,
                                self.model_max_len, group_size=self.shape.group_size)

    def new_cache(self, max_new_tokens: int | None = None, prompt_len: int | None = None, plan: dict | None = None,
                  capture_window: int = 0) -> DynamicCache:
        """A fresh compressed cache.

        With ``prompt_len`` the caller feeds ``prompt[:-1]`` and then the last prompt token itself (the paper's
        "last prompt token is the first decode step"); ``plan`` (default: planned at the prefill) must be the
        method's plan for that length.  ``capture_window`` keeps the last queries of the prefill, so that
        ``fork`` can compress it later.
        """
        cache = self._install(CompressedCache(), max_new_tokens)
        if prompt_len is not None:
            self.state.prompt_len = prompt_len
            self.state.split_prefill = False
        self.state.plan = plan
        self.state.capture_window = capture_window
        return cache

    def fork(self, shared: DynamicCache, plan: dict | None = None, max_new_tokens: int | None = None) -> DynamicCache:
        """This session's compressed cache built from a shared dense prefill of ``prompt[:-1]``.

        ``shared`` comes from ``new_cache(prompt_len=..., capture_window=...)`` of a ``full`` session after the
        prefill forward; it is only read.  ``plan`` defaults to the method's plan for its prompt length.
        """
        source: GenerationState = shared.layers[0].state
        cache = self._install(CompressedCache(), max_new_tokens)
        state = self.state
        state.prompt_len, state.split_prefill = source.prompt_len, False
        state.group_size, state.element_size = source.group_size, source.element_size
        state.plan = plan if plan is not None else self.plan_for(source.prompt_len, state.max_new_tokens)
        for src, layer in zip(shared.layers, cache.layers):
            if src.captured_q is None or src.captured_q.shape[-2] < min(self.method.window, src.stored):
                raise ValueError("the shared prefill kept fewer queries than this method's window; "
                                 "create it with capture_window >= the largest window")
            layer.share(src)
            compress_layer(layer, src.captured_q, src.stored, src.captured_scaling)
        return cache

    def next_turn(self, cache: DynamicCache, turn_tokens: int, max_new_tokens: int | None = None) -> None:
        """Prepare ``cache``, which holds the earlier turns of a conversation, for the next one: the caller then
        feeds the turn's ``turn_tokens`` tokens (all but the last in one forward, then the last as the first decode
        step, as for the first prompt) and decodes up to ``max_new_tokens``.  Layers whose method tracks its
        history (RocketKV-MT) prefill the turn densely over the whole history and compress it again; every other
        layer keeps what its method kept and decodes the turn's tokens with the method's decode, one step each
        (one-shot methods compress at the first prefill only).  Statistics keep adding up over the turns."""
        room = turn_tokens + 1 + self._max_new(max_new_tokens)
        with torch.inference_mode(cache.layers[0].keys.is_inference()):  # as the forwards that built the cache
            for layer in cache.layers:
                layer.begin_turn(room)

    def _max_new(self, max_new_tokens: int | None = None) -> int:
        return max_new_tokens or self.max_new_tokens or self.model.generation_config.max_new_tokens or 128

    def _install(self, cache: Cache, max_new_tokens: int | None = None) -> Cache:
        self.state = GenerationState(self.method, self._max_new(max_new_tokens), self.model_max_len)
        cache.layers = [CompressedLayer(self.state, i) for i in range(self.shape.num_layers)]
        cache.layer_class_to_replicate = None
        self.state.layers = cache.layers
        return cache

    def _pre_forward(self, module, args, kwargs):
        # The cache the forward will use: under its own name, else under the deprecated alias (which the forward
        # renames; given both, it keeps its own name).  ``generate`` passes ``cache`` from 5.24 on.
        name = cache_kwarg(module)
        if name not in kwargs and LEGACY_CACHE_KWARG in kwargs:
            name = LEGACY_CACHE_KWARG
        cache = kwargs.get(name)
        if cache is None and kwargs.get("use_cache") is not False:
            cache = kwargs[name] = self.new_cache()
        elif cache is not None:
            self._adopt(name, cache)
        kwargs[CACHE_KWARG] = cache  # every attention call finds its layer here (``attention.py``)
        return args, kwargs

    def _adopt(self, name: str, cache) -> None:
        """Make a cache passed to the forward a compressed one (an empty ``DynamicCache`` from ``generate``)."""
        if not isinstance(cache, Cache):
            raise TypeError(f"{name} of type {type(cache).__name__} is not supported; pass a transformers Cache")
        if cache.layers and all(isinstance(l, CompressedLayer) for l in cache.layers):
            return
        if cache.get_seq_length() > 0:
            raise ValueError("the cache passed to the model already holds tokens that were not compressed; "
                             "start from an empty cache inside `rocketkv.compress`")
        bad = [type(l).__name__ for l in cache.layers if type(l) is not DynamicLayer]
        if bad:
            raise ValueError(f"unsupported cache layers {sorted(set(bad))}: rocketkv needs full-attention layers with a "
                             "dynamic cache (no sliding-window, static, quantized or linear-attention layers)")
        self._install(cache)

    def stats(self) -> dict:
        return self.state.summary() if self.state is not None else {}

    def release(self) -> dict:
        """The latest generation's statistics; then the state lets go of its cache layers.  Layers and state
        refer to each other, so without this a finished cache (its K/V included) lives until the next garbage
        collection instead of being freed when its last user drops it."""
        stats = self.stats()
        if self.state is not None:
            self.state.layers = []
            self.state.stats.static.clear()  # a layer's static cost may hold the layer
        return stats

    @property
    def plan(self) -> dict | None:
        """The latest generation's plan."""
        return None if self.state is None else self.state.plan


def check_model(model) -> None:
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"{type(model).__name__} uses sliding-window attention (sliding_window={cfg.sliding_window}), "
                         "which rocketkv does not support")
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"{type(model).__name__} has attention layer types {sorted(layer_types)}; "
                         "rocketkv supports full-attention layers only")
    if not getattr(model, "_supports_attention_backend", False) and not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} does not use transformers' attention interface")
    if getattr(cfg, "rope_parameters", None) is None and getattr(cfg, "rope_theta", None) is None:
        raise ValueError(f"{type(model).__name__} has no RoPE-style attention (no rope parameters in its config); "
                         "rocketkv supports RoPE decoder models (Llama, Mistral, Qwen2, ...)")


def as_method(method: Method | str, budget: Any = _UNSET, **overrides: Any) -> Method:
    """``method`` itself when it is a ``Method`` (then no budget or options may be given), else built by name."""
    if isinstance(method, Method):
        if budget is not _UNSET or overrides:
            raise TypeError(f"method is already built ({method.name}, budget={method.budget}): "
                            "give a method name to set a budget or options")
        return method
    return make_method(method, budget=DEFAULT_BUDGET if budget is _UNSET else budget, **overrides)


@contextlib.contextmanager
def compress(model, method: Method | str = "rocketkv", budget: int | None = _UNSET,
             max_new_tokens: int | None = None, model_max_len: int | None = None, **overrides: Any):
    """Compress the KV cache of every forward pass of ``model`` inside the ``with`` block.

    ``method`` is a name (with ``budget``, default 256, and the method's options as keywords) or a ``Method``
    built once with ``make_method``.  ``max_new_tokens`` is the decode length the budget split plans for
    (RocketKV's capacity); by default the model's ``generation_config.max_new_tokens`` or 128.
    ``model_max_len`` caps the planned sequence length.
    """
    m = as_method(method, budget, **overrides)
    check_model(model)
    session = CompressionSession(model, m, max_new_tokens, model_max_len)
    m.check_shape(session.shape.num_layers, session.shape.num_kv_heads)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    handle = model.register_forward_pre_hook(session._pre_forward, with_kwargs=True)
    try:
        yield session
    finally:
        handle.remove()
        model.set_attn_implementation(previous)


def resolve_budget(method: str, budget: int | None, prompt_len: int, max_new_tokens: int, head_dim: int,
                   model_max_len: int | None = None, group_size: int = 1, **overrides: Any) -> dict:
    """The concrete parameters ``method`` uses for one sample (pure, cheap)."""
    return make_method(method, budget=budget, **overrides).plan(prompt_len, max_new_tokens, head_dim, model_max_len,
                                                                group_size=group_size)
