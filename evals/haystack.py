"""Haystack text for retrieval tasks.

- ``noise``: RULER's repeated filler sentences.
- ``prose``: real English prose shipped in ``evals/data/haystack_prose.txt`` — the prose paragraphs of the
  Python documentation topics bundled with CPython 3.11 (``Lib/pydoc_data/topics.py``), PSF License 2.0.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PROSE_FILE = Path(__file__).resolve().parent / "data" / "haystack_prose.txt"
HAYSTACKS = ("noise", "prose")


@lru_cache(maxsize=4)
def haystack_text(kind: str, min_chars: int = 0) -> str:
    if kind == "noise":
        base = NOISE
    elif kind == "prose":
        base = PROSE_FILE.read_text(encoding="utf-8").replace("\n", " ")
    else:
        raise ValueError(f"haystack={kind!r} is not valid; use one of {HAYSTACKS}")
    text = base
    while len(text) < min_chars:
        text = f"{text} {base}"
    return text


def haystack_ids(tokenizer, kind: str, n_tokens: int, text: str | None = None) -> list[int]:
    """At least ``n_tokens`` token ids of the haystack (the text is repeated as needed); ``text`` replaces the
    built-in haystack ``kind`` (a user's file)."""
    chars = max(4 * n_tokens, 1000)
    while True:
        hay = haystack_text(kind, chars) if text is None else _repeated(text, chars)
        ids = tokenizer(hay, add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        chars *= 2


def _repeated(base: str, min_chars: int) -> str:
    if not base.strip():
        raise ValueError("the haystack text is empty")
    return " ".join([base] * max(1, -(-min_chars // (len(base) + 1))))
