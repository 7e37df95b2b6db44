"""Decode-time kernels with a torch / triton / numba backend switch.

backend="auto" runs the Triton kernel when the inputs live on CUDA and triton
imports; on the CPU the numba kernels (``numba_cpu``: a step's selection, its
attention over the selected slots and its read counts) where numba imports and
the tensors are fp32, otherwise the vectorised torch reference, which is also
every kernel's oracle in the tests.  Triton and numba are imported lazily so
this package works on machines without them.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from rocketkv.core.kernels import reference
from rocketkv.core.kernels.interpreter import patch_scalar_index

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_scalar_index()  # the interpreter with numpy >= 2.4 (see interpreter.py)

__all__ = [
    "dense_decode_attention",
    "fold_page_bounds",
    "fold_sparq_slot",
    "hsa_page_probs",
    "quest_group_scores",
    "select_units",
    "slot_scores",
    "sparse_decode_attention",
    "triton_available",
]

BACKENDS = ("auto", "torch", "triton", "numba")


@functools.lru_cache(maxsize=None)
def _triton_module(name: str = "triton_decode") -> ModuleType | None:
    try:
        return importlib.import_module(f"rocketkv.core.kernels.{name}")
    except ImportError:
        return None


def sparse_attention_supported(head_dim: int) -> bool:
    """The Triton sparse attention kernel needs a power-of-2 head dim >= 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def triton_available() -> bool:
    return _triton_module() is not None


@functools.lru_cache(maxsize=None)
def _numba_module() -> ModuleType | None:
    try:
        return importlib.import_module("rocketkv.core.kernels.numba_cpu")
    except ImportError:
        return None


def use_numba(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` runs the numba CPU kernel for ``tensors`` ("auto": all on the CPU, floats fp32, and numba
    imports; "numba" where they qualify, else an error naming why not)."""
    if backend not in ("auto", "numba"):
        return False
    fits = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)
    if backend == "numba":
        if _numba_module() is None:
            raise RuntimeError("backend='numba' requested but numba is not importable; pip install numba, or use "
                               "kernels=auto or torch")
        if not fits:
            raise ValueError("backend='numba' runs fp32 CPU tensors only; got "
                             f"{[(t.device.type, t.dtype) for t in tensors]}; use kernels=auto or torch")
        return True
    return fits and _numba_module() is not None


def use_triton(backend: str, tensor: torch.Tensor, supported: bool = True) -> bool:
    """Whether ``backend`` runs the Triton kernel for inputs like ``tensor`` ("auto": on CUDA, when supported)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend in ("torch", "numba"):
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        return True
    return tensor.is_cuda and supported and triton_available()


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
        return _triton_module("triton_dense").dense_decode_attention(q, keys, values, upto, scale)
    return reference.dense_decode_attention(q, keys, values, upto, scale)


def attend_selected(q, keys, values, idx, scale: float, logits=None):
    """Exact attention of ``q`` ``[B,Hkv,g,d]`` over the slots ``idx`` ``[B,Hkv,G,k]`` (G = 1 or g; -1 pads) with the
    numba CPU kernel (``ops.attend_indices`` picks it, and keeps the torch paths)."""
    return _numba_module().attend(q, keys, values, idx, scale, logits)


# ---------------------------------------------------------------- a decode step's selection (Triton: one launch each)
def fold_page_bounds(keys, page_min_t, page_max_t, upto, page_size: int, backend: str = "auto") -> bool:
    """Fold slot ``upto - 1`` into its page's min/max keys with the Triton or numba kernel; False: use the torch
    path."""
    if use_triton(backend, keys):
        _triton_module("triton_pages").fold_page_bounds(keys, page_min_t, page_max_t, upto, page_size)
    elif use_numba(backend, keys, page_min_t, page_max_t):
        _numba_module().fold_page_bounds(keys, page_min_t, page_max_t, upto, page_size)
    else:
        return False
    return True


def fold_sparq_slot(keys, values, keys_t, value_sum, upto, backend: str = "auto") -> bool:
    """Fold slot ``upto - 1`` into SparQ's metadata (its key into that column of the channel-major copy ``keys_t``
    ``[B, Hkv, d, C]``, its value into the fp32 running sum ``value_sum`` ``[B, Hkv, d]``) with the Triton or numba
    kernel; False: use the torch path."""
    if use_triton(backend, keys):
        _triton_module("triton_sparq").fold_slot(keys, values, keys_t, value_sum, upto)
    elif use_numba(backend, keys, values, keys_t, value_sum):
        _numba_module().fold_sparq_slot(keys, values, keys_t, value_sum, upto)
    else:
        return False
    return True


def hsa_page_probs(q, page_min_t, page_max_t, upto, page_size: int, channels: int, backend: str = "auto"):
    """HSA's per-page slot probabilities ``[B, Hkv, P]`` (``reference.hsa_page_probs``); pages past upto unset
    on Triton."""
    if use_triton(backend, q):
        return _triton_module("triton_pages").hsa_page_probs(q, page_min_t, page_max_t, upto, page_size, channels)
    if use_numba(backend, q, page_min_t, page_max_t):
        return _numba_module().hsa_page_probs(q, page_min_t, page_max_t, upto, page_size, channels)
    return reference.hsa_page_probs(q, page_min_t, page_max_t, upto, page_size, channels)


def quest_group_scores(q, page_min_t, page_max_t, upto, page_size: int, backend: str = "auto"):
    """Quest's page bounds summed over each group's heads ``[B, Hkv, P]``, -inf past ``upto``."""
    if use_triton(backend, q):
        return _triton_module("triton_pages").quest_group_scores(q, page_min_t, page_max_t, upto, page_size)
    return reference.quest_group_scores(q, page_min_t, page_max_t, upto, page_size)


def select_units(scores, upto, page_size: int, budget: int, width: int, split: bool, mass: bool = False,
                 backend: str = "auto", masked: bool = False):
    """Exact top units of each row of ``scores`` ``[B, R, U]`` (``reference.select_units``): slots ``[B, R, width]``
    ascending with -1 after, their count per row, and (``mass``) their share of the scores' softmax.  ``masked``: the
    units past ``upto`` already score no more than any live unit (-inf; or 0 under probabilities, without ``mass``),
    so the torch path need not mask them (the Triton kernel never reads them)."""
    if use_triton(backend, scores):
        return _triton_module("triton_select").select(scores, upto, page_size, budget, width, split, mass)
    if use_numba(backend, scores):
        return _numba_module().select(scores, upto, page_size, budget, width, split, mass, masked)
    return reference.select_units(scores, upto, page_size, budget, width, split, mass, masked)


def slot_scores(q, keys, upto, channels=None, backend: str = "auto"):
    """``q·k`` per head over the buffer ``[B, Hkv, g, C]`` fp32, -inf from ``upto`` on (``reference.scores``).
    ``keys`` ``[B, Hkv, C, d]`` row-major, or with ``channels`` a channel-major copy seen through ``.mT``."""
    if use_triton(backend, q):
        return _triton_module("triton_select").scores(q, keys, upto, channels)
    if channels is not None and keys.stride(-2) == 1 and use_numba(backend, q, keys):
        return _numba_module().channel_scores(q, keys.mT, upto, channels)
    return reference.scores(q, keys, upto, channels)


def union_reads(idx, upto, token_weight: int, n_slots: int, channels=None, n_channels: int = 0,
                backend: str = "auto"):
    """Per (row, KV head) ``[B, Hkv]`` int64: distinct slots (below ``n_slots``) of the g heads' sets ``idx``
    ``[B,Hkv,g,k]`` (-1 pads) times ``token_weight``, plus with ``channels`` ``[B,Hkv,g,r]`` (below ``n_channels``)
    their distinct channels times ``upto``."""
    if use_triton(backend, idx):
        return _triton_module("triton_select").union_reads(idx, upto, token_weight, channels)
    if use_numba(backend, idx):
        return _numba_module().union_reads(idx, upto, token_weight, n_slots, channels, n_channels)
    return reference.union_reads(idx, upto, token_weight, channels, n_slots, n_channels)
