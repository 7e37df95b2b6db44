"""Greedy decoding of several compressed caches of one prompt as the rows of one batch.

The caches are a grid's cells forked from one shared prefill.  Each forward runs the model's projections and
MLPs once for all rows (one weight read instead of one per cell) while attention stays per row, through each
row's own method (``RowStackLayer``).  Batched matrix products round differently from batch-1 ones, so a row
whose two best logits are closer than ``tie_margin`` at any step is dropped: its greedy choice could differ from
a separate run's, and the caller decodes that cell on the exact per-cell path instead.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from rocketkv.cache import RowStackLayer
from rocketkv.generation import GreedyStream, Timer, eos_token_ids
from rocketkv.session import cache_kwarg


def stack_rows(caches: list[DynamicCache], widths: list[int] | None = None) -> DynamicCache:
    """One cache whose batch rows are ``caches`` (compressed); their layers are shared.  With ``widths`` the rows
    are packed into one sequence, ``widths[i]`` tokens for row i (``RowStackLayer``)."""
    stacked = DynamicCache()
    stacked.layers = [RowStackLayer([c.layers[i] for c in caches], widths) for i in range(len(caches[0].layers))]
    stacked.layer_class_to_replicate = None
    return stacked


@torch.inference_mode()
def decode_rows(model, tokenizer, caches: list[DynamicCache], last_prompt_token: int, max_new_tokens: int,
                stop: list[str] | None, ignore_eos: bool, tie_margin: float
                ) -> tuple[list[GreedyStream | None], float, float]:
    """Feed the last prompt token to every cache, then decode greedily, finished rows leaving the batch.

    Returns each row's stream (None for rows dropped at a near tie), the seconds of the first forward (the last
    prompt token) and of the decode loop after it."""
    eos = set() if ignore_eos else eos_token_ids(model, tokenizer)
    streams: list[GreedyStream | None] = [GreedyStream(tokenizer, max_new_tokens, stop, eos) for _ in caches]
    active = list(range(len(caches)))
    fed = [last_prompt_token] * len(caches)
    seconds = []
    while active:
        with Timer(model.device) as t:
            ids = torch.tensor(fed, device=model.device).unsqueeze(1)
            logits = model(input_ids=ids, **{cache_kwarg(model): stack_rows([caches[i] for i in active])},
                           use_cache=True, logits_to_keep=1).logits[:, -1]
            top = logits.float().topk(2, dim=-1)
            margins = (top.values[:, 0] - top.values[:, 1]).tolist()
            chosen = top.indices[:, 0].tolist()
        seconds.append(t.seconds)
        still, fed = [], []
        for row, i in enumerate(active):
            if margins[row] < tie_margin:
                streams[i] = None
            elif not streams[i].push(chosen[row]):
                still.append(i)
                fed.append(chosen[row])
        active = still
    return streams, seconds[0], sum(seconds[1:])
