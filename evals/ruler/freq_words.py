"""Frequent words extraction (RULER ``freq_words_extraction.py``): coded six-letter words drawn with Zipf
frequencies (alpha 2.0); the most frequent "word" is the noise "...", the answers are ranks 2-4."""
from __future__ import annotations

import random
import string
from functools import lru_cache
from typing import Any

from evals.ruler.generation import Draft
from evals.ruler.templates import FAMILIES

CODED_WORD_LEN = 6


@lru_cache(maxsize=None)
def zeta(alpha: float, terms: int = 100_000) -> float:
    head = sum(k ** -alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1)  # integral bound for the tail


def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> list[int]:
    norm = zeta(alpha)
    return [int(num_words * k ** -alpha / norm) for k in range(1, vocab_size + 1)]


class FreqWordsGenerator:
    def __init__(self, params: dict[str, Any], length: int):
        self.alpha = params["alpha"]
        self.vocab_size = max(8, length // 50)  # RULER: max_seq_length // 50
        self.family = FAMILIES["freq_words"]
        self.max_units = max(1, length)
        self.min_units = self._smallest_unambiguous()

    def _smallest_unambiguous(self) -> int:
        """Fewest words for which ranks 2-4 (the answers) each occur more often than the next rank."""
        for n in range(1, self.max_units + 1):
            counts = zipf_counts(n, 5, self.alpha)
            if counts[1] > counts[2] > counts[3] > counts[4]:
                return n
        return self.max_units

    def draft(self, rng: random.Random, units: int, index: int) -> Draft:
        vocab: set[str] = set()
        while len(vocab) < self.vocab_size:
            vocab.add("".join(rng.choice(string.ascii_lowercase) for _ in range(CODED_WORD_LEN)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent rank is noise
        words = [w for w, count in zip(ranked, zipf_counts(units, self.vocab_size, self.alpha)) for _ in range(count)]
        rng.shuffle(words)
        prompt = self.family.template.format(context=" ".join(words))
        return Draft(prompt, self.family.answer_prefix, ranked[1:4], {"haystack_units": units})
