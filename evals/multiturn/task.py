"""Multi-turn key-value retrieval, generated offline: one long shared context, then questions one after another.

The context is an instruction and a haystack (``task.haystack``) holding ``task.needles`` key -> value lines at
evenly spread depths; each of the ``task.turns`` turns asks for the value of a different key (in a seeded order),
after the previous answer.  Lengths are the context's, in the model's tokens.  A turn scores 100 when the first
number of the answer is the key's value (exact match); the headline is the mean over every turn, and
``metrics.json`` also gives the mean per turn index.  The cache is carried across turns: a method that evicts at
the first prefill answers later questions from what it kept then.
"""
from __future__ import annotations

import random
import re
import string

from evals.base import Sample, Task, Turn, int_list, int_option, mean_over_turns
from evals.haystack import HAYSTACKS, haystack_ids

INSTRUCTION = ("Below is a long text with a few special lines of the form \"The value of key K is V.\" hidden in it. "
               "Memorize them: I will ask you about them one after another.")
NEEDLE = "The value of key {key} is {value}."
QUESTION = "\n\nQuestion: What is the value of key {key}?\nAnswer: The value of key {key} is"


def first_number(text: str) -> str:
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


class MultiTurnTask(Task):
    name = "multiturn"
    multi_turn = True
    splits_questions = True  # the query-agnostic mode prefills the context alone, before the first turn

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lengths = int_list("lengths", cfg.get("lengths", [1000, 2000]), 64, "[1000,2000]")
        self.turns = int_option("turns", cfg.get("turns", 3), 1)
        needles = cfg.get("needles")
        self.needles = self.turns if needles is None else int_option("needles", needles, 1)
        if self.needles < self.turns:
            raise ValueError(f"task.needles={self.needles} is below task.turns={self.turns}: every turn asks about a "
                             "different key; use task.needles >= task.turns")
        self.repeats = int_option("repeats", cfg.get("repeats", 1), 1)
        self.haystack = str(cfg.get("haystack", "noise"))
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"task.haystack={self.haystack!r} is not valid; use one of {HAYSTACKS}")
        self.seed = int_option("seed", cfg.get("seed", 0), 0)
        self.max_new_tokens = int_option("max_new_tokens", cfg.get("max_new_tokens", 12), 1)

    def validate(self, model_max_len: int) -> None:
        question = 40  # generous tokens per question
        too_long = [n for n in self.lengths if n + self.turns * (question + self.max_new_tokens) > model_max_len]
        if too_long:
            raise ValueError(f"task.lengths {too_long} plus {self.turns} turns of questions and answers exceed the "
                             f"model's max length {model_max_len}; use shorter lengths or fewer turns")

    def samples(self, tokenizer, model_max_len):
        rng = random.Random(self.seed)
        out = []
        for n in self.lengths:
            for r in range(self.repeats):
                keys = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(self.needles)]
                while len(set(keys)) < len(keys):
                    keys = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(self.needles)]
                values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
                asked = rng.sample(range(self.needles), self.turns)
                out.append(self._sample(tokenizer, n, r, keys, values, asked))
        return out

    def _sample(self, tokenizer, length, repeat, keys, values, asked) -> Sample:
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        overhead = len(tokenizer(" ".join([INSTRUCTION, *needles]), add_special_tokens=True).input_ids) + 2
        hay = haystack_ids(tokenizer, self.haystack, max(0, length - overhead))
        cuts = [round((i + 1) * len(hay) / (len(needles) + 1)) for i in range(len(needles))]
        parts, start = [INSTRUCTION], 0
        for cut, needle in zip(cuts, needles):
            parts += [tokenizer.decode(hay[start:cut]).strip(), needle]
            start = cut
        parts.append(tokenizer.decode(hay[start:]).strip())
        turns = [Turn(QUESTION.format(key=keys[i]), [values[i]], {"key": keys[i], "needle": i}) for i in asked]
        return Sample(id=f"len{length}_turns{self.turns}_rep{repeat}", prompt=" ".join(p for p in parts if p),
                      references=[values[i] for i in asked], max_new_tokens=self.max_new_tokens, stop=["\n"],
                      subtask=f"len={length}", meta={"length": length, "needles": len(needles)}, turns=turns)

    def score(self, sample, prediction):
        raise NotImplementedError("multiturn scores each turn (score_turn)")

    def score_turn(self, sample, turn, prediction):
        return 100.0 * (first_number(prediction) == sample.turns[turn].references[0])

    def aggregate(self, records):
        return mean_over_turns(records)

    def protocol(self):
        return {"task": self.name, "lengths": self.lengths, "turns": self.turns, "needles": self.needles,
                "repeats": self.repeats, "haystack": self.haystack, "seed": self.seed,
                "max_new_tokens": self.max_new_tokens, "instruction": INSTRUCTION, "needle": NEEDLE,
                "question": QUESTION, "metric": "first number == value"}
