"""Fitting a generated prompt to its token budget, as RULER does: binary search on the haystack size.

Length definition (RULER's): the final prompt, counted in the model's tokens exactly as the runner builds it
(``evals.prompting.prompt_token_ids`` with the chat template when the tokenizer has one, then the answer
prefix), plus the task's ``max_new_tokens``, is at most ``max_seq_length``.  The haystack size is the largest that
satisfies this, so the total normally lands in the last 10% below ``max_seq_length``.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from evals.base import Sample
from evals.prompting import PromptFormat, prompt_token_ids

log = logging.getLogger(__name__)

NO_TRUNCATION = 1 << 40


@dataclass
class Draft:
    """A generated prompt before it becomes a ``Sample``."""
    prompt: str
    answer_prefix: str
    references: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class Generator(Protocol):
    """One RULER task family at one target length; ``units`` is the haystack size (words, sentences, docs)."""
    min_units: int
    max_units: int

    def draft(self, rng: random.Random, units: int, index: int) -> Draft: ...


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by ``random``: stable across processes and Python versions.
    return random.Random(f"ruler/{seed}/{task}/{length}/{index}")


def count_tokens(tokenizer: Any, sample: Sample, fmt: PromptFormat | None = None) -> int:
    """The sample's prompt tokens, built as the runner builds them (``fmt``: the model's prompt rules)."""
    rules = PromptFormat(fmt.format, fmt.add_bos) if fmt is not None else PromptFormat()  # never capped here
    return len(prompt_token_ids(tokenizer, sample, model_chat=True, model_max_len=NO_TRUNCATION, fmt=rules))


def largest_fitting(cost: Callable[[int], int], budget: int, lo: int, hi: int, hint: int | None = None
                    ) -> int | None:
    """Largest ``n`` in ``[lo, hi]`` with ``cost(n) <= budget``, for ``cost`` (near enough) increasing in ``n``.

    The search starts from ``hint`` (the previous sample's answer) or, for the first sample, from a linear
    estimate through two measured sizes, then gallops and bisects: a handful of ``cost`` calls, not ``log2(hi)``.
    """
    if hi < lo or cost(lo) > budget:
        return None
    if hint is None and hi > lo:
        probe = min(hi, 2 * lo + 8)
        slope = (cost(probe) - cost(lo)) / (probe - lo)
        hint = int(lo + (budget - cost(lo)) / slope) if slope > 0 else hi
    good, bad = lo, hi + 1  # cost(good) fits; bad is past the end or known not to fit
    if hint is not None and lo < hint <= hi:
        step = max(1, hint // 1024)
        if cost(hint) <= budget:
            good = hint
            while good + step <= hi and cost(good + step) <= budget:
                good += step
                step *= 2
            bad = min(bad, good + step)
        else:
            bad = hint
            while bad - step > good and cost(bad - step) > budget:
                bad -= step
                step *= 2
            if bad - step > good:
                good = bad - step
    while bad - good > 1:
        mid = (good + bad) // 2
        if cost(mid) <= budget:
            good = mid
        else:
            bad = mid
    return good


def generate_samples(task: str, generator: Generator, length: int, num_samples: int, seed: int, tokenizer: Any,
                     max_new_tokens: int, fmt: PromptFormat | None = None) -> list[Sample]:
    """``num_samples`` samples of ``task`` whose prompt tokens plus ``max_new_tokens`` fit ``length``."""
    budget = length - max_new_tokens
    samples: list[Sample] = []
    hint = None
    for index in range(num_samples):
        built: dict[int, tuple[Sample, int]] = {}

        def build(units: int) -> tuple[Sample, int]:
            if units not in built:
                draft = generator.draft(sample_rng(seed, task, length, index), units, index)
                sample = Sample(id=f"{task}/{length}/{index}", prompt=draft.prompt, references=draft.references,
                                max_new_tokens=max_new_tokens, chat_template=True, subtask=task,
                                meta={"length": length, **draft.meta}, answer_prefix=draft.answer_prefix)
                built[units] = (sample, count_tokens(tokenizer, sample, fmt))
            return built[units]

        units = largest_fitting(lambda n: build(n)[1], budget, generator.min_units, generator.max_units, hint)
        if units is None:
            smallest = build(generator.min_units)[1] + max_new_tokens
            raise ValueError(f"RULER {task}: max_seq_length={length} is too short; its smallest prompt needs "
                             f"{smallest} tokens including {max_new_tokens} generated tokens")
        sample, tokens = build(units)
        sample.meta["prompt_tokens"] = tokens
        if tokens + max_new_tokens < 0.9 * length:
            log.warning("RULER %s sample %d: %d prompt + %d generated tokens is under 90%% of %d (haystack size "
                        "%d of at most %d)", task, index, tokens, max_new_tokens, length, units, generator.max_units)
        samples.append(sample)
        hint = units
    return samples
