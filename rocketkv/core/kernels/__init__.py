"""Decode-time kernels with a torch / triton backend switch.

backend="auto" runs the Triton kernel when the inputs live on CUDA and triton
imports, otherwise the vectorised torch reference. Triton is imported lazily so
this package works on machines without it.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from rocketkv.core.kernels import reference
from rocketkv.core.kernels.interpreter import patch_scalar_index

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_scalar_index()  # the interpreter with numpy >= 2.4 (see interpreter.py)

__all__ = [
    "dense_decode_attention",
    "quest_page_scores",
    "rocketkv_page_scores",
    "sparse_decode_attention",
    "triton_available",
]

_BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    try:
        from rocketkv.core.kernels import triton_decode
    except ImportError:
        return None
    return triton_decode


@functools.lru_cache(maxsize=1)
def _triton_dense_module() -> ModuleType | None:
    try:
        from rocketkv.core.kernels import triton_dense
    except ImportError:
        return None
    return triton_dense


def sparse_attention_supported(head_dim: int) -> bool:
    """The Triton sparse attention kernel needs a power-of-2 head dim >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def triton_available() -> bool:
    return _triton_module() is not None


def use_triton(backend: str, tensor: torch.Tensor, supported: bool = True) -> bool:
    """Whether ``backend`` runs the Triton kernel for inputs like ``tensor`` ("auto": on CUDA, when supported)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {_BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        return True
    return tensor.is_cuda and supported and triton_available()


def rocketkv_page_scores(
    q: torch.Tensor,
    page_min_t: torch.Tensor,
    page_max_t: torch.Tensor,
    channels: torch.Tensor,
    signs: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Page scores from r sign-selected channels: float32 [B, Hkv, g, P].

    q [B, Hkv, g, d]; page_min_t / page_max_t [B, Hkv, d, P]; channels [B, Hkv, r]
    int64; signs [B, Hkv, r] (+1 uses the page max on that channel, -1 the min).
    """
    if use_triton(backend, q):
        return _triton_module().rocketkv_page_scores(q, page_min_t, page_max_t, channels, signs)
    return reference.rocketkv_page_scores(q, page_min_t, page_max_t, channels, signs)


def quest_page_scores(
    q: torch.Tensor,
    page_min_t: torch.Tensor,
    page_max_t: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Quest page upper bounds over all d channels: float32 [B, Hkv, g, P]."""
    if use_triton(backend, q):
        return _triton_module().quest_page_scores(q, page_min_t, page_max_t)
    return reference.quest_page_scores(q, page_min_t, page_max_t)


def sparse_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over the slots in indices [B, Hkv, k] (-1 = padding): [B, Hkv, g, d], q's dtype.

    keys / values [B, Hkv, S, d]. The triton backend needs a power-of-2 head dim >= 16;
    "auto" falls back to torch otherwise.
    """
    if use_triton(backend, q, sparse_attention_supported(q.shape[-1])):
        return _triton_module().sparse_decode_attention(q, keys, values, indices, scale)
    return reference.sparse_decode_attention(q, keys, values, indices, scale)


def dense_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    upto: torch.Tensor,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over the contiguous slots ``[0, upto)`` of keys / values [B, Hkv, C, d]: [B, Hkv, g, d], q's dtype.

    ``upto`` is a 0-dim integer tensor on q's device (read on the device only, so the call can be replayed in a
    CUDA graph).  The triton backend needs a power-of-2 head dim >= 16; "auto" falls back to torch otherwise.
    """
    if use_triton(backend, q, sparse_attention_supported(q.shape[-1])):
        return _triton_dense_module().dense_decode_attention(q, keys, values, upto, scale)
    return reference.dense_decode_attention(q, keys, values, upto, scale)
