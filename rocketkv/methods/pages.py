"""Page metadata shared by Quest and RocketKV: element-wise min and max keys of every ``p`` consecutive slots.

Stored channel-major (``[B, Hkv, d, P]``) so reading a few channels of every page is contiguous.  Decode
tokens fill the last page, then open new ones; only the pages touched since the last call are recomputed.
"""
from dataclasses import dataclass

import torch

from rocketkv.cache import CompressedLayer
from rocketkv.methods.base import token_sees


def index_pages(layer: CompressedLayer, page_size: int, upto: int | None = None) -> None:
    """Cover slots ``[0, upto)`` (all stored slots by default); a later call extends and redoes the last page."""
    stored = layer.stored if upto is None else upto
    if layer.n_indexed == stored and "page_min_t" in layer.meta:
        return
    first_page = layer.n_indexed // page_size
    start = first_page * page_size
    keys = layer.keys[:, :, start:stored]
    n_new = keys.shape[2]
    n_pages = -(-n_new // page_size)
    pad = n_pages * page_size - n_new
    b, hkv, _, d = keys.shape
    if pad:
        filler = keys[:, :, -1:].expand(b, hkv, pad, d)  # repeating a real key leaves min/max unchanged
        keys = torch.cat([keys, filler], dim=2)
    pages = keys.view(b, hkv, n_pages, page_size, d)
    new_min = pages.amin(dim=3).transpose(2, 3)
    new_max = pages.amax(dim=3).transpose(2, 3)
    if "page_min_t" in layer.meta:
        new_min = torch.cat([layer.meta["page_min_t"][..., :first_page], new_min], dim=-1)
        new_max = torch.cat([layer.meta["page_max_t"][..., :first_page], new_max], dim=-1)
    layer.meta["page_min_t"] = new_min.contiguous()
    layer.meta["page_max_t"] = new_max.contiguous()
    layer.n_indexed = stored


@dataclass
class TokenPages:
    """Page min/max keys as each of ``n`` consecutive tokens sees them (token i: slots ``[0, first_slot + i]``).

    ``fixed_*`` (``[B,Hkv,d,F]``, shared by all tokens) are the complete pages before the one holding
    ``first_slot``; ``touched_*`` (``[B·n,Hkv,d,P']``, tokens folded into the batch axis, token-minor) are the
    later pages reduced per token over its visible slots, and ``exists`` (``[n,P']``) is False for pages a token
    cannot see yet (their bounds are 0)."""

    fixed_min: torch.Tensor
    fixed_max: torch.Tensor
    touched_min: torch.Tensor
    touched_max: torch.Tensor
    exists: torch.Tensor


def page_bounds_per_token(layer: CompressedLayer, page_size: int, first_slot: int, n: int) -> TokenPages:
    """Page metadata for ``decode_many``: pages up to ``first_slot`` from the layer's index (brought up to
    ``first_slot``), the rest reduced per token."""
    index_pages(layer, page_size, first_slot)
    fixed = first_slot // page_size
    start, end = fixed * page_size, first_slot + n
    n_pages = -(-(end - start) // page_size)
    keys = layer.keys[:, :, start:end]
    b, hkv, _, d = keys.shape
    keys = torch.nn.functional.pad(keys, (0, 0, 0, n_pages * page_size - (end - start)))
    sees = token_sees(start + torch.arange(n_pages * page_size, device=keys.device), first_slot, n)  # [n, slots]
    hidden = ~sees[None, None, :, :, None]
    shape = (b, hkv, n, n_pages, page_size, d)
    empty = ~sees.view(n, n_pages, page_size).any(-1)  # [n,P']
    touched = []
    for fill, reduce in ((float("inf"), torch.amin), (float("-inf"), torch.amax)):
        bound = reduce(keys[:, :, None].masked_fill(hidden, fill).view(shape), dim=4)  # [B,Hkv,n,P',d]
        bound = bound.masked_fill(empty[:, :, None], 0.0).permute(0, 2, 1, 4, 3)  # [B,n,Hkv,d,P']
        touched.append(bound.reshape(b * n, hkv, d, n_pages).to(layer.meta["page_min_t"].dtype))
    return TokenPages(layer.meta["page_min_t"][..., :fixed], layer.meta["page_max_t"][..., :fixed],
                      touched[0], touched[1], ~empty)


def page_to_slots(page_scores: torch.Tensor, page_size: int, upto: int) -> torch.Tensor:
    """Broadcast per-page scores ``[..., P]`` to the first ``upto`` slots ``[..., upto]``."""
    return page_scores.repeat_interleave(page_size, dim=-1)[..., :upto]


def token_rows(idx: torch.Tensor, b: int, n: int, g: int) -> torch.Tensor:
    """One selection per (token, KV group), ``[B·n,Hkv,1,k]``, as one per folded query row ``[B,Hkv,g·n,k]``
    (the row layout of ``causal_rows``)."""
    _, hkv, _, k = idx.shape
    return idx.view(b, n, hkv, k).permute(0, 2, 1, 3).unsqueeze(2).expand(b, hkv, g, n, k).reshape(b, hkv, g * n, k)
