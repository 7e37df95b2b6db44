"""Greedy decoding of a grid's cells by verifying drafts, as speculative decoding does, with no draft model.

Most cells of a grid generate what full KV generates, or what another cell generates, or text the prompt holds
(a needle's "The pass key is ..."): their tokens are predictable before they are decoded.  Each round feeds
every unfinished cell its next token plus a draft of the tokens likely to follow, as the rows of one batch; one
forward gives the cell's greedy choice after every fed token, and the cell keeps the draft up to the first token
its own choice disagrees with, plus that choice.  Attention over the fed tokens runs through each method's
``decode_many``: token i sees exactly what it would see decoded alone, so the kept tokens are the cell's own
greedy tokens.  A cell's rejected tokens are dropped from its cache and from its statistics.

Drafts (``draft``): the continuation of any decode already known to start with the cell's tokens (full KV's,
another cell's), else the tokens that followed the latest earlier occurrence of the cell's last 2-3 tokens in its
own output, in this prompt's decodes so far (every cell's output, its own included; there the last token alone
also counts: cells that left every known text still write alike) or in the prompt (prompt lookup).  A forward
costs about one weight read up to ~16 token rows, so a narrow batch (full KV alone, the last unfinished cells)
takes longer lookups than a wide one.  The rows are packed into one sequence (``RowStackLayer.widths``), so a row
fed one token costs one decode step and no padding.

As with batched rows, batched products round differently from a cell decoded alone: a cell whose two best
logits come closer than ``tie_margin`` at a kept position leaves (``None``) for the exact per-cell path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from rocketkv.generation import GreedyStream, Timer, eos_token_ids
from rocketkv.row_decode import stack_rows
from rocketkv.session import cache_kwarg

NGRAM = 3  # longest tail matched in the prompt lookup
MIN_MATCH = 2  # shortest tail matched in the prompt: what followed a single matching token there is almost never
# what comes next
LOOKUP_TOKENS = 4  # longest prompt-lookup draft in a wide batch: such drafts are often wrong, and every fed token
# costs a row of every projection
CHEAP_TOKEN_ROWS = 16  # a forward with up to this many token rows costs about one weight read: a narrow batch
# takes longer prompt-lookup drafts (a row alone, up to 16 tokens)


def ngram_index(texts: list[list[int]], shortest: int) -> dict:
    """Every n-gram (``shortest`` <= n <= NGRAM) of ``texts`` -> where the tokens after its latest occurrence start,
    in the first text that holds it: (that text, offset)."""
    index = {}
    for text in reversed(texts):  # the first text's entries are written last
        for n in range(shortest, NGRAM + 1):
            for start in range(len(text) - n):  # an occurrence needs a token after it
                index[tuple(text[start:start + n])] = (text, start + n)
    return index


def decode_ngrams(decodes: list[list[int]], prompt_tail: list[int]) -> dict:
    """``ngram_index`` of ``decodes``, each read after ``prompt_tail`` (the prompt's last tokens), down to one token."""
    return ngram_index([prompt_tail + decode for decode in decodes], 1)


@dataclass
class Lookup:
    """Where each n-gram (MIN_MATCH <= n <= NGRAM) of the prompt last occurs, for prompt-lookup drafts."""

    tokens: list[int]
    last: dict = field(init=False)  # ``ngram_index`` of the prompt

    def __post_init__(self):
        self.last = ngram_index([self.tokens], MIN_MATCH)

    def follow(self, outputs: list[int], max_len: int, decodes: dict | None = None) -> list[int]:
        """What followed the latest earlier occurrence of the longest matching tail (NGRAM tokens down) of the
        prompt and ``outputs``: searched in ``outputs``, then in ``decodes`` (``decode_ngrams`` of this prompt's
        decodes so far), then in the prompt.  A tail of one token counts only in the decodes: there the next token
        was right 8 times in 28 on the 2k grid benchmark, in the prompt 3 times in 94."""
        text = self.tokens[-NGRAM:] + outputs
        for n in range(NGRAM, 0, -1):
            tail = text[-n:]
            if n >= MIN_MATCH:
                for start in range(len(outputs) - n - 1, -1, -1):
                    if outputs[start:start + n] == tail:
                        return outputs[start + n:start + n + max_len]
            for index in (decodes or {}, self.last):  # the prompt's index holds no single tokens
                found = index.get(tuple(tail))
                if found is not None:
                    source, after = found
                    return source[after:after + max_len]
        return []


def draft(context: list[int], sources: list[list[int]], lookup: Lookup, max_len: int,
          lookup_len: int = LOOKUP_TOKENS, ngrams: dict | None = None) -> list[int]:
    """Up to ``max_len`` tokens likely to follow ``context`` (a cell's output so far): the longest continuation
    among ``sources`` (outputs of the same prompt) that start with it, else a lookup of up to ``lookup_len``
    tokens (``Lookup.follow``) in the cell's output, the sources' n-grams (``ngrams``: ``decode_ngrams`` of
    ``sources``, built once by a caller drafting many rows) and the prompt."""
    if max_len <= 0:
        return []
    best: list[int] = []
    for source in sources:
        if len(source) > len(context) + len(best) and source[:len(context)] == context:
            best = source[len(context):]
    if best:
        return best[:max_len]
    if ngrams is None:
        ngrams = decode_ngrams(sources, lookup.tokens[-NGRAM:])
    return lookup.follow(context, min(max_len, lookup_len), ngrams)


@torch.inference_mode()
def verify_rows(model, tokenizer, caches: list[DynamicCache], prompt_ids: list[int], known: list[list[int]],
                max_new_tokens: int, stop: list[str] | None, ignore_eos: bool, tie_margin: float
                ) -> tuple[list[GreedyStream | None], list[float]]:
    """Greedy tokens of each cache (forked from a shared prefill of ``prompt_ids[:-1]``).

    ``known`` are finished decodes of the same prompt (e.g. full KV's) used as drafts.  Returns each row's stream
    (None for a row that met a near tie) and each row's share of the forwards' seconds."""
    eos = set() if ignore_eos else eos_token_ids(model, tokenizer)
    streams: list[GreedyStream | None] = [GreedyStream(tokenizer, max_new_tokens, stop, eos) for _ in caches]
    states = [cache.layers[0].state for cache in caches]
    for state in states:
        state.hold_costs()
    lookup = Lookup(prompt_ids)
    pending = [prompt_ids[-1]] * len(caches)  # each row's next token to feed: chosen, not yet in its cache
    seconds = [0.0] * len(caches)
    active = list(range(len(caches)))
    while active:
        sources = known + [s.tokens for s in streams if s is not None]  # every row's output so far
        feeds = []
        lookup_len = max(LOOKUP_TOKENS, CHEAP_TOKEN_ROWS // len(active))
        ngrams = decode_ngrams(sources, prompt_ids[-NGRAM:])
        for i in active:
            room = max_new_tokens - len(streams[i].tokens) - 1  # choices a forward can still use, less the first
            feeds.append([pending[i]] + draft(streams[i].tokens, sources, lookup, room, lookup_len, ngrams))
        widths = [len(f) for f in feeds]
        ids = torch.tensor([[token for f in feeds for token in f]], device=model.device)
        positions = [caches[i].layers[0].seen + j for i, f in zip(active, feeds) for j in range(len(f))]
        with Timer(model.device) as t:
            logits = model(input_ids=ids, position_ids=torch.tensor([positions], device=model.device),
                           **{cache_kwarg(model): stack_rows([caches[i] for i in active], widths)},
                           use_cache=True).logits[0]
            top = logits.float().topk(2, dim=-1)
            margins = (top.values[:, 0] - top.values[:, 1]).split(widths)
            chosen = top.indices[:, 0].split(widths)
        still = []
        for row, i in enumerate(active):
            seconds[i] += t.seconds / len(active)
            kept, going = _accept(streams[i], feeds[row], chosen[row].tolist(), margins[row].tolist(), tie_margin)
            if kept is None:
                streams[i] = None
                continue
            states[i].keep_costs(kept)
            for layer in caches[i].layers:
                layer.drop_newest(widths[row] - kept)
            if going:
                pending[i] = streams[i].tokens[-1]
                still.append(i)
            else:
                states[i].settle()
        active = still
    return streams, seconds


def _accept(stream: GreedyStream, fed: list[int], chosen: list[int], margins: list[float], tie_margin: float
            ) -> tuple[int | None, bool]:
    """Push the row's greedy choices while they agree with what was fed after them.  Returns how many fed tokens
    stay in the cache (None at a near tie) and whether the row goes on."""
    for j in range(len(fed)):
        if margins[j] < tie_margin:
            return None, False
        if stream.push(chosen[j]):
            return j + 1, False
        if j + 1 == len(fed) or fed[j + 1] != chosen[j]:
            return j + 1, True
    raise AssertionError("unreachable: the last fed position always ends the loop")
