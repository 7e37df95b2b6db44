"""Haystack material: RULER's noise sentences and the essay haystack made of the shipped prose.

RULER's essay haystack is Paul Graham's essays; here it is ``evals/data/haystack_prose.txt`` (paragraphs of
CPython documentation prose, PSF License 2.0).  Like RULER, the essay is one whitespace-normalised word stream
whose first ``n`` words make the haystack; beyond its ~29k words the stream starts over.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

PROSE_PATH = Path(__file__).resolve().parent.parent / "data" / "haystack_prose.txt"

# Sentence ends followed by a capital, digit, quote or bracket; a stand-in for nltk's punkt, whose model is not
# shipped offline.  Splitting a little too often (after "e.g.") only adds insertion points.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


@lru_cache(maxsize=1)
def prose_text() -> str:
    return PROSE_PATH.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def prose_sha256() -> str:
    return hashlib.sha256(prose_text().encode()).hexdigest()


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", prose_text()).strip().split(" "))


def essay_prefix(num_words: int) -> str:
    """The first ``num_words`` words of the (cyclically repeated) essay stream."""
    words = essay_words()
    full, rest = divmod(num_words, len(words))
    return " ".join(list(words) * full + list(words[:rest]))


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]
