"""``compress(model, method, budget)``: run a Hugging Face causal LM with a compressed KV cache.

Hooks into transformers through its seams only: an attention function and a matching mask function
registered under one name (``AttentionInterface`` / ``AttentionMaskInterface``), and cache layers
(``CompressedLayer``, a ``DynamicLayer`` subclass) placed in the ``Cache`` the forward pass receives.

The forward pass takes its cache as ``past_key_values`` up to transformers 5.23 and as ``cache`` from 5.24 on
(``past_key_values`` stays a deprecated alias, and ``generate`` passes ``cache``): ``cache_kwarg`` reads the name
from the model's ``forward`` signature, and the pre-forward hook looks under both.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

from rocketkv.cache import CompressedLayer, RowStackLayer, active_layer
from rocketkv.methods import Method, make_method
from rocketkv.methods.full import FullKV

ATTN_NAME = "rocketkv"
LEGACY_CACHE_KWARG = "past_key_values"


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters  # follows the decorators' ``__wrapped__``
    return "cache" if "cache" in params else LEGACY_CACHE_KWARG


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes its ``Cache`` under: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return _cache_kwarg_of(type(model))


# ---------------------------------------------------------------------- per-generation state
@dataclass
class GenerationState:
    """Shared by the layers of one cache: the method, this sample's plan and the running statistics."""

    method: Method
    max_new_tokens: int
    model_max_len: int | None
    plan: dict | None = None
    prompt_len: int | None = None
    group_size: int = 1
    dense: Method = field(default_factory=FullKV)
    steps: int = 0
    attended_sum: float = 0.0
    elements_sum: float = 0.0
    element_size: int = 4
    layers: list = field(default_factory=list)
    split_prefill: bool = True  # the first forward holds the whole prompt: its last token is decoded separately
    capture_window: int = 0  # keep this many last prefill queries per layer (shared prefill of a grid)
    held: list | None = None  # per-layer costs of fed tokens not yet kept (``hold_costs``)

    def method_for(self, layer_idx: int) -> Method:
        """The method that runs ``layer_idx``: full KV for skipped layers and for samples the plan makes dense."""
        if layer_idx < self.method.skip_layers or (self.plan or {}).get("dense"):
            return self.dense
        return self.method

    def record(self, layer_idx: int, attended, elements) -> None:
        """Add one layer's ``StepCost`` (floats or device scalars, summed where they live: no host read)."""
        if self.held is not None:
            return self.record_tokens(layer_idx, *(torch.as_tensor(c, dtype=torch.float64).reshape(1)
                                                   for c in (attended, elements)))
        if layer_idx == 0:
            self.steps += 1
        self.attended_sum = self.attended_sum + attended
        self.elements_sum = self.elements_sum + elements

    def record_tokens(self, layer_idx: int, attended: torch.Tensor, elements: torch.Tensor) -> None:
        """One layer's costs of ``n`` consecutive tokens (``[n]`` tensors); held back under ``hold_costs``."""
        if self.held is not None:
            self.held.append((attended, elements))
            return
        if layer_idx == 0:
            self.steps += attended.shape[0]
        self.attended_sum = self.attended_sum + attended.sum()
        self.elements_sum = self.elements_sum + elements.sum()

    def hold_costs(self) -> None:
        """From now on, keep the costs of fed tokens apart until ``keep_costs`` says how many tokens stay
        (verifying a draft feeds tokens that may be dropped again)."""
        self.held = []

    def keep_costs(self, n_tokens: int) -> None:
        """Count the held costs of the first ``n_tokens`` tokens fed since the last call; drop the rest."""
        self.steps += n_tokens
        for attended, elements in self.held:
            self.attended_sum = self.attended_sum + attended[:n_tokens].sum()
            self.elements_sum = self.elements_sum + elements[:n_tokens].sum()
        self.held = []

    def settle(self) -> None:
        """Bring every layer's method metadata up to its stored slots, where a decode's last step leaves it."""
        for layer in self.layers:
            self.method_for(layer.layer_idx).index(layer, self.plan)

    def stats(self) -> dict:
        n_layers = max(1, len(self.layers))
        steps = max(1, self.steps)
        kept = [l.kept_after_prefill for l in self.layers if l.kept_after_prefill is not None]
        kv_bytes = sum(l.kv_bytes() for l in self.layers)
        attended, elements = float(self.attended_sum), float(self.elements_sum)
        return {
            "kept_tokens": sum(kept) / len(kept) if kept else 0.0,
            "attended_tokens": attended / (steps * n_layers),
            "elements_read_per_step": elements / steps,
            "bytes_read_per_step": elements * self.element_size / steps,
            "stored_kv_bytes": float(kv_bytes),
            "metadata_bytes": float(sum(l.meta_bytes() for l in self.layers)),
            "decode_steps": self.steps,
        }


# ---------------------------------------------------------------------- attention and mask functions
def _dense_fallback(query, key, value, scaling):
    """No cache of ours (e.g. ``use_cache=False``): plain causal attention, queries aligned to the last keys."""
    n, s = query.shape[-2], key.shape[-2]
    mask = torch.ones(n, s, dtype=torch.bool, device=query.device).tril(s - n)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=key.shape[1] != query.shape[1])


def rocketkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = active_layer()
    if layer is None or layer.keys is not key:
        out = _dense_fallback(query, key, value, scaling)
    elif isinstance(layer, RowStackLayer) and layer.widths is not None:  # packed rows: one sequence
        out = torch.cat([_attend(row, segment, scaling)
                         for row, segment in zip(layer.rows, query.split(layer.widths, dim=2))], dim=2)
    elif isinstance(layer, RowStackLayer):
        out = torch.cat([_attend(row, query[i:i + 1], scaling) for i, row in enumerate(layer.rows)])
    else:
        out = _attend(layer, query, scaling)
    return out.transpose(1, 2).contiguous(), None


def rocketkv_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """Masks are built from stored positions inside the attention function; only padding is refused here."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise NotImplementedError("padded batches are not supported with a compressed KV cache; "
                                  "run one sequence at a time (batch size 1) or equal-length sequences")
    return None


AttentionInterface.register(ATTN_NAME, rocketkv_attention)
AttentionMaskInterface.register(ATTN_NAME, rocketkv_mask)


def _attend(layer: CompressedLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    state: GenerationState = layer.state
    b, hq, n, d = query.shape
    hkv = layer.keys.shape[1]
    q = query.reshape(b, hkv, hq // hkv, n, d)
    if not layer.compressed:
        return _prefill(layer, state, query, q, scaling)
    return _decode_tokens(layer, state, state.method_for(layer.layer_idx), q, layer.stored - n, scaling)


def _prefill(layer, state, query, q, scaling):
    n = query.shape[2]
    if state.plan is None:
        state.prompt_len = state.prompt_len or n
        state.group_size = q.shape[2]
        state.element_size = layer.keys.element_size()
        state.plan = state.method.plan(state.prompt_len, state.max_new_tokens, q.shape[-1], state.model_max_len,
                                       group_size=state.group_size)
    method = state.method_for(layer.layer_idx)
    split = n - 1 if method.decode_last_prompt_token and state.split_prefill and n >= 2 else n
    hkv = layer.keys.shape[1]
    if state.capture_window:
        # a copy: a view would keep every prefill query of the layer alive for as long as the shared cache
        layer.captured_q = q[..., max(0, split - state.capture_window):split, :].clone()
        layer.captured_scaling = scaling
    prefix_out = F.scaled_dot_product_attention(query[:, :, :split], layer.keys[:, :, :split],
                                                layer.values[:, :, :split], is_causal=True, scale=scaling,
                                                enable_gqa=hkv != query.shape[1])
    _compress_layer(layer, method, q[..., :split, :], split, state.plan, scaling)
    if split == n:
        return prefix_out
    last = _decode_tokens(layer, state, method, q[:, :, :, split:], layer.stored - (n - split), scaling)
    return torch.cat([prefix_out, last], dim=2)


def _compress_layer(layer, method, q_window, prompt_len, plan, scaling) -> None:
    method.compress(layer, q_window, prompt_len, plan, scaling)
    layer.compressed = True
    layer.kept_after_prefill = _kept(layer, prompt_len)


def _kept(layer: CompressedLayer, prompt_len: int) -> float:
    in_prompt = layer.positions < prompt_len
    if layer.visible is not None:
        in_prompt = in_prompt & layer.visible.any(dim=2)
    return in_prompt.sum(-1).float().mean().item()


def _decode_tokens(layer, state, method, q, first_slot, scaling):
    """Decode-mode attention for the ``n`` newest stored slots; token i sees slots ``[0, first_slot + i]``."""
    b, hkv, g, n, d = q.shape
    if n == 1:
        method.index(layer, state.plan, first_slot + 1)  # metadata must not see later slots
        out, cost = method.decode(layer, q[:, :, :, 0], first_slot + 1, state.plan, scaling)
        state.record(layer.layer_idx, cost.attended, cost.elements)
        return out.reshape(b, hkv * g, 1, d)
    out, cost = method.decode_many(layer, q, first_slot, state.plan, scaling)  # a draft verified in one pass
    state.record_tokens(layer.layer_idx, cost.attended, cost.elements)
    return out.reshape(b, hkv * g, n, d)


# ---------------------------------------------------------------------- the public context manager
SUPPORTED_ATTN_IMPLS = ("eager", "sdpa", ATTN_NAME)


class CompressionSession:
    """Returned by ``compress``; ``stats()`` gives the statistics of the latest generation."""

    def __init__(self, model, method: Method, max_new_tokens: int | None, model_max_len: int | None):
        self.model = model
        self.method = method
        self.max_new_tokens = max_new_tokens
        self.model_max_len = model_max_len
        self.state: GenerationState | None = None

    def new_cache(self, max_new_tokens: int | None = None, prompt_len: int | None = None,
                  capture_window: int = 0) -> DynamicCache:
        """A fresh compressed cache.

        With ``prompt_len`` the caller feeds ``prompt[:-1]`` and then the last prompt token itself (the paper's
        "last prompt token is the first decode step"); the budget is planned for ``prompt_len``.
        ``capture_window`` keeps the last queries of the prefill so ``fork`` can compress it later.
        """
        cache = DynamicCache()
        self._install(cache, max_new_tokens)
        if prompt_len is not None:
            self.state.prompt_len = prompt_len
            self.state.split_prefill = False
        self.state.capture_window = capture_window
        return cache

    def fork(self, shared: DynamicCache, max_new_tokens: int | None = None) -> DynamicCache:
        """This session's compressed cache built from a shared dense prefill of ``prompt[:-1]``.

        ``shared`` comes from ``new_cache(prompt_len=..., capture_window=...)`` of a ``full`` session after the
        prefill forward.  Its slots are read in place, not copied (``CompressedLayer.share``); eviction gathers
        into new tensors.
        """
        source: GenerationState = shared.layers[0].state
        cache = DynamicCache()
        self._install(cache, max_new_tokens)
        state = self.state
        state.prompt_len, state.split_prefill = source.prompt_len, False
        state.group_size, state.element_size = source.group_size, source.element_size
        first = shared.layers[0]
        head_dim = first.keys.shape[-1]
        state.plan = self.method.plan(state.prompt_len, state.max_new_tokens, head_dim, state.model_max_len,
                                      group_size=state.group_size)
        for src, layer in zip(shared.layers, cache.layers):
            if src.captured_q is None or src.captured_q.shape[-2] < min(self.method.window, src.stored):
                raise ValueError("the shared prefill kept fewer queries than this method's window; "
                                 "create it with capture_window >= the largest window")
            layer.share(src)
            _compress_layer(layer, state.method_for(layer.layer_idx), src.captured_q, src.stored, state.plan,
                            src.captured_scaling)
        return cache

    def _install(self, cache: Cache, max_new_tokens: int | None = None) -> None:
        n_layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        max_new = max_new_tokens or self.max_new_tokens or self.model.generation_config.max_new_tokens or 128
        self.state = GenerationState(self.method, max_new, self.model_max_len)
        cache.layers = [CompressedLayer(self.state, i) for i in range(n_layers)]
        cache.layer_class_to_replicate = None
        self.state.layers = cache.layers

    def _pre_forward(self, module, args, kwargs):
        # The cache the forward will use: under its own name, else under the deprecated alias (which the forward
        # renames; given both, it keeps its own name).  ``generate`` passes ``cache`` from 5.24 on.
        name = cache_kwarg(module)
        if name not in kwargs and LEGACY_CACHE_KWARG in kwargs:
            name = LEGACY_CACHE_KWARG
        cache = kwargs.get(name)
        if cache is None:
            if kwargs.get("use_cache") is False:
                return None
            kwargs[name] = self.new_cache()
            return args, kwargs
        if not isinstance(cache, Cache):
            raise TypeError(f"{name} of type {type(cache).__name__} is not supported; pass a transformers Cache")
        if cache.layers and all(isinstance(l, (CompressedLayer, RowStackLayer)) for l in cache.layers):
            return None
        if cache.get_seq_length() > 0:
            raise ValueError("the cache passed to the model already holds tokens that were not compressed; "
                             "start from an empty cache inside `rocketkv.compress`")
        bad = [type(l).__name__ for l in cache.layers if type(l) is not DynamicLayer]
        if bad:
            raise ValueError(f"unsupported cache layers {sorted(set(bad))}: rocketkv needs full-attention layers with a "
                             "dynamic cache (no sliding-window, static, quantized or linear-attention layers)")
        self._install(cache)
        return None

    def stats(self) -> dict:
        return self.state.stats() if self.state is not None else {}

    def release(self) -> dict:
        """The latest generation's statistics; then the state lets go of its cache layers.  Layers and state
        refer to each other, so without this a finished cache (its K/V included) lives until the next garbage
        collection instead of being freed when its last user drops it."""
        stats = self.stats()
        if self.state is not None:
            self.state.layers = []
        return stats

    @property
    def plan(self) -> dict | None:
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


@contextlib.contextmanager
def compress(model, method: str = "rocketkv", budget: int | None = 256, max_new_tokens: int | None = None,
             model_max_len: int | None = None, **overrides: Any):
    """Compress the KV cache of every forward pass of ``model`` inside the ``with`` block.

    ``max_new_tokens`` is the decode length the budget split plans for (RocketKV's capacity); by default the
    model's ``generation_config.max_new_tokens`` or 128.  ``model_max_len`` caps the planned sequence length.
    """
    m = make_method(method, budget=budget, **overrides)
    check_model(model)
    session = CompressionSession(model, m, max_new_tokens, model_max_len)
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
    m = make_method(method, budget=budget, **overrides)
    return m.plan(prompt_len, max_new_tokens, head_dim, model_max_len, group_size=group_size)
