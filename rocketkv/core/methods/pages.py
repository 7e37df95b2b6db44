"""Page metadata shared by Quest and RocketKV: element-wise min and max keys of every ``p`` consecutive slots.

Stored channel-major (``[B, Hkv, d, P]``) in ``layer.meta`` so reading a few channels of every page is
contiguous.  Decode tokens fill the last page, then open new ones; only the pages touched since the last call
are recomputed.
"""
import torch

from rocketkv.core.cache import CompressedLayer


def index_pages(layer: CompressedLayer, page_size: int, upto: int | None = None) -> None:
    """Cover slots ``[0, upto)`` (all stored slots by default); a later call extends and redoes the last page."""
    meta = layer.meta
    stored = layer.stored if upto is None else upto
    indexed = meta.get("pages_cover", 0)
    if indexed == stored and "page_min_t" in meta:
        return
    first_page = indexed // page_size
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
    if "page_min_t" in meta:
        new_min = torch.cat([meta["page_min_t"][..., :first_page], new_min], dim=-1)
        new_max = torch.cat([meta["page_max_t"][..., :first_page], new_max], dim=-1)
    meta["page_min_t"] = new_min.contiguous()
    meta["page_max_t"] = new_max.contiguous()
    meta["pages_cover"] = stored


def page_to_slots(page_scores: torch.Tensor, page_size: int, upto: int) -> torch.Tensor:
    """Broadcast per-page scores ``[..., P]`` to the first ``upto`` slots ``[..., upto]``."""
    return page_scores.repeat_interleave(page_size, dim=-1)[..., :upto]
