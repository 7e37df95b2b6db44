"""Page metadata shared by Quest and RocketKV: element-wise min and max keys of every ``p`` consecutive slots.

Stored channel-major (``[B, Hkv, d, P]``) in ``layer.meta`` so reading a few channels of every page is
contiguous, with ``P = ⌈C/p⌉`` pages for the whole buffer: a decode step has static shapes.  ``index_pages`` with
an int builds the pages of slots ``[0, upto)``; with a device ``upto`` (a decode step) it folds the newest slot,
``upto - 1``, into its page, which opens a page when the slot is its first.
"""
import torch

from rocketkv.core import kernels
from rocketkv.core.cache import CompressedLayer
from rocketkv.core.methods.ops import ceil_div, widened


def index_pages(layer: CompressedLayer, page_size: int, upto: int | torch.Tensor | None = None,
                backend: str = "auto") -> None:
    if upto is None or isinstance(upto, int):
        _build(layer, page_size, layer.stored if upto is None else upto)
    else:
        _fold_newest(layer, page_size, upto, backend)


def _build(layer: CompressedLayer, page_size: int, upto: int) -> None:
    keys = layer.keys[:, :, :upto]
    b, hkv, _, d = keys.shape
    n_pages = ceil_div(upto, page_size)
    pad = n_pages * page_size - upto
    if pad:
        keys = torch.cat([keys, keys[:, :, -1:].expand(b, hkv, pad, d)], dim=2)  # a repeated key: same min/max
    pages = keys.view(b, hkv, n_pages, page_size, d)
    for name, bound in (("page_min_t", pages.amin(dim=3)), ("page_max_t", pages.amax(dim=3))):
        table = layer.keys.new_zeros(b, hkv, d, ceil_div(layer.capacity, page_size))
        table[..., :n_pages] = bound.transpose(2, 3)
        layer.meta[name] = table


def _fold_newest(layer: CompressedLayer, page_size: int, upto: torch.Tensor, backend: str) -> None:
    meta = layer.meta
    for name in ("page_min_t", "page_max_t"):
        meta[name] = widened(meta[name], ceil_div(layer.capacity, page_size))
    if not kernels.fold_page_bounds(layer.keys, meta["page_min_t"], meta["page_max_t"], upto, page_size, backend):
        fold_reference(layer.keys, meta["page_min_t"], meta["page_max_t"], upto, page_size)


def fold_reference(keys: torch.Tensor, page_min_t: torch.Tensor, page_max_t: torch.Tensor, upto: torch.Tensor,
                   page_size: int) -> None:
    """Fold the key of slot ``upto - 1`` into its page's min/max (a page's first slot replaces them)."""
    slot = (upto - 1).view(1)
    page = slot // page_size
    key = keys.index_select(2, slot).transpose(2, 3)  # [B,Hkv,d,1]
    opens = slot % page_size == 0
    for table, fold in ((page_min_t, torch.minimum), (page_max_t, torch.maximum)):
        table.index_copy_(-1, page, torch.where(opens, key, fold(table.index_select(-1, page), key)))


def table_bytes(layer: CompressedLayer, page_size: int) -> int:
    """Bytes of the page min/max keys of the pages that hold stored slots (the tables have room for more)."""
    tables = [layer.meta[name] for name in ("page_min_t", "page_max_t") if name in layer.meta]
    pages = ceil_div(layer.stored, page_size)
    return sum(t[..., :pages].numel() * t.element_size() for t in tables)
