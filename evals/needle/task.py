"""Passkey retrieval ("needle in a haystack") over a grid of context lengths × needle depths × repeats.

Prompt: instruction, haystack with the needle at the given depth, question; a raw completion prompt by default,
or the model's chat template with ``task.chat_template=true`` (the answer prefix then follows the template).
Lengths are in the model's tokens, depth is a fraction 0–1 of the haystack.  A sample scores 100 when the
normalised passkey is a substring of the normalised output; the headline is the mean over cells of the mean
per cell.

``task.length_unit=words`` builds RocketKV's official passkey prompts instead (``evals.needle.words``): lengths
are haystack words, the prompt is raw (no template, no answer prefix, no stop string), keys are ``key_digits``
random digits.  ``task.haystack=file`` reads the haystack from ``task.haystack_file`` (a text file or a folder of
.txt files).
"""
from __future__ import annotations

import random
import re

from evals.base import Sample, Task, check_lengths_fit, int_list, int_option
from evals.haystack import HAYSTACKS, haystack_ids, haystack_text
from evals.needle import words as official

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = " The pass key is"
HAYSTACK_KINDS = (*HAYSTACKS, "file")
LENGTH_UNITS = ("tokens", "words")


def normalise(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


class NeedleTask(Task):
    name = "needle"
    splits_questions = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lengths = int_list("lengths", cfg.get("lengths", [1000, 2000, 4000]), 64, "[1000,2000]")
        depths = list(cfg.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0]))
        if not depths or any(isinstance(d, (bool, str)) or not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"task.depths={depths} is not valid; depths are fractions between 0 and 1, "
                             "e.g. task.depths=[0.0,0.5,1.0]")
        self.depths = [float(x) for x in depths]
        self.repeats = int_option("repeats", cfg.get("repeats", 1), 1)
        self.haystack = str(cfg.get("haystack", "noise"))
        self.seed = int_option("seed", cfg.get("seed", 0), 0)
        self.max_new_tokens = int_option("max_new_tokens", cfg.get("max_new_tokens", 16), 1)
        self.chat_template = bool(cfg.get("chat_template", False))
        self.length_unit = str(cfg.get("length_unit", "tokens"))
        self.key_digits = int_option("key_digits", cfg.get("key_digits", 7), 1)
        if self.haystack not in HAYSTACK_KINDS:
            raise ValueError(f"task.haystack={self.haystack!r} is not valid; use one of {HAYSTACK_KINDS}")
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"task.length_unit={self.length_unit!r} is not valid; use one of {LENGTH_UNITS}")
        self.haystack_file = cfg.get("haystack_file", None)
        if self.haystack == "file":
            self.haystack_file = str(official.haystack_path(self.haystack_file))
        if self.words and self.chat_template:
            raise ValueError("task.length_unit=words builds the official raw prompts; it takes no chat template "
                             "(task.chat_template=false)")

    @property
    def words(self) -> bool:
        return self.length_unit == "words"

    def validate(self, model_max_len: int) -> None:
        if not self.words:  # word lengths are checked in tokens when the prompts are built
            check_lengths_fit(self.lengths, self.max_new_tokens, model_max_len)

    def samples(self, tokenizer, model_max_len):
        rng = random.Random(self.seed)
        # keys drawn in sample order; the tokens layout keeps its keys without a leading zero
        low, high = 10 ** (self.key_digits - 1), 10 ** self.key_digits - 1
        draw = (lambda: official.passkey(rng, self.key_digits)) if self.words else (lambda: str(rng.randint(low, high)))
        keys = {(n, d, r): draw() for n in self.lengths for d in self.depths for r in range(self.repeats)}
        out = []
        for n in self.lengths:
            for d in self.depths:
                for r in range(self.repeats):
                    make = self._words_sample if self.words else self._sample
                    out.append(make(tokenizer, n, d, r, keys[(n, d, r)]))
            if self.words:
                self._check_fits(tokenizer, out[-1], model_max_len)
        return out

    def _check_fits(self, tokenizer, sample: Sample, model_max_len: int) -> None:
        """A length in words must fit the model in tokens (the official prompts are never truncated)."""
        tokens = len(tokenizer(sample.prompt, add_special_tokens=True).input_ids)
        if tokens + self.max_new_tokens > model_max_len:
            raise ValueError(f"task.lengths: {sample.meta['length']} words make a prompt of {tokens} tokens, which "
                             f"with {self.max_new_tokens} new tokens exceeds the model's max length {model_max_len}; "
                             "use fewer words")

    def _texts(self) -> tuple[tuple[str, int], ...]:
        if self.haystack == "file":
            return official.haystack_texts(self.haystack_file)
        text = haystack_text(self.haystack)
        return ((text, len(official.WORD.findall(text))),)

    def _words_sample(self, tokenizer, length, depth, repeat, key) -> Sample:
        prompt = official.passkey_prompt(self._texts(), length, depth, key)
        return Sample(id=f"len{length}_depth{depth:.2f}_rep{repeat}", prompt=prompt, references=[key],
                      max_new_tokens=self.max_new_tokens, chat_template=False, stop=[], answer_prefix="",
                      question=official.QUESTION, subtask=f"len={length}/depth={depth:.2f}", meta={"length": length, "depth": depth})

    def _sample(self, tokenizer, length, depth, repeat, key) -> Sample:
        needle = NEEDLE.format(key=key)
        overhead = len(tokenizer(f"{INSTRUCTION} {needle} {QUESTION}{ANSWER_PREFIX}",
                                 add_special_tokens=True).input_ids) + 2
        if self.chat_template and getattr(tokenizer, "chat_template", None):
            template = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                     add_generation_prompt=True)
            overhead += len(tokenizer(template, add_special_tokens=False).input_ids)
        if self.haystack == "file":
            text = " ".join(t for t, _ in official.haystack_texts(self.haystack_file)).replace("\n", " ")
            hay = haystack_ids(tokenizer, "file", max(0, length - overhead), text=text)
        else:
            hay = haystack_ids(tokenizer, self.haystack, max(0, length - overhead))
        cut = int(round(depth * len(hay)))
        before = tokenizer.decode(hay[:cut]).strip()
        after = tokenizer.decode(hay[cut:]).strip()
        prompt = " ".join(p for p in (INSTRUCTION, before, needle, after, QUESTION) if p)
        answer_prefix = ANSWER_PREFIX.strip() if self.chat_template else ANSWER_PREFIX
        return Sample(id=f"len{length}_depth{depth:.2f}_rep{repeat}", prompt=prompt, references=[key],
                      max_new_tokens=self.max_new_tokens, chat_template=self.chat_template, stop=["\n"],
                      answer_prefix=answer_prefix, question=QUESTION,
                      subtask=f"len={length}/depth={depth:.2f}", meta={"length": length, "depth": depth})

    def score(self, sample, prediction):
        return 100.0 * any(normalise(ref) in normalise(prediction) for ref in sample.references)

    def protocol(self):
        out = {"task": self.name, "lengths": self.lengths, "depths": self.depths, "repeats": self.repeats,
               "haystack": self.haystack, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
               "instruction": INSTRUCTION, "needle": NEEDLE, "question": QUESTION + ANSWER_PREFIX,
               "chat_template": self.chat_template}
        if self.haystack == "file":
            out["haystack_sha256"] = official.haystack_sha256(self.haystack_file)
        if self.words:
            out.update(length_unit="words", instruction=official.INSTRUCTION, needle=official.NEEDLE,
                       question=official.QUESTION, key_digits=self.key_digits, stop=[])
        elif self.key_digits != 7:
            out["key_digits"] = self.key_digits
        return out
