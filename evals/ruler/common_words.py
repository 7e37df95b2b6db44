"""Common words extraction (RULER ``common_words_extraction.py``): a numbered word list in which 10 words repeat
often and the rest rarely; the question asks for the 10 common ones.  One worked example precedes it."""
from __future__ import annotations

import random
from typing import Any

from evals.ruler.generation import Draft
from evals.ruler.templates import FAMILIES
from evals.ruler.words import common_words_pool


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


class CommonWordsGenerator:
    def __init__(self, params: dict[str, Any], length: int):
        self.num_cw = params["num_cw"]
        # RULER's rule: below 4096 tokens the repeat counts (and the example's) shrink so the list still fits.
        if length < 4096:
            self.repeats, self.example = (6, 1), (20, 3, 1)
        else:
            self.repeats, self.example = (params["freq_cw"], params["freq_ucw"]), (40, 10, 3)
        self.min_units = self.num_cw + 1
        # each listed word costs at least two tokens ("12." and the word)
        self.max_units = max(self.min_units, length // (2 * self.repeats[1]))
        self.pool = common_words_pool(self.max_units)
        self.family = FAMILIES["common_words"]

    def word_list(self, rng: random.Random, num_words: int, common_repeats: int, rare_repeats: int):
        words = rng.sample(self.pool, num_words)
        common, rare = words[:self.num_cw], words[self.num_cw:]
        listed = common * common_repeats + rare * rare_repeats
        rng.shuffle(listed)
        return numbered(listed), common

    def draft(self, rng: random.Random, units: int, index: int) -> Draft:
        example_context, example_answer = self.word_list(rng, *self.example)
        example = (self.family.template.format(context=example_context) + self.family.answer_prefix + " "
                   + numbered(example_answer))
        context, answer = self.word_list(rng, units, *self.repeats)
        prompt = example + "\n" + self.family.template.format(context=context)
        return Draft(prompt, self.family.answer_prefix, answer, {"haystack_units": units})
