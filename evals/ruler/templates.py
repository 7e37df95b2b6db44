"""RULER's prompt templates, answer prefixes, generation lengths and metrics, and the 13 standard task settings.

The texts follow NVIDIA/RULER ``scripts/data/synthetic/constants.py`` word for word (including its typo
"assgined"), so scores stay comparable with published RULER numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."


@dataclass(frozen=True)
class Family:
    template: str
    answer_prefix: str
    max_new_tokens: int
    metric: str  # a name in evals.ruler.metrics.METRICS


FAMILIES: dict[str, Family] = {
    "niah": Family(
        template=("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                  "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"),
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
        max_new_tokens=128,
        metric="string_match_all",
    ),
    "variable_tracking": Family(
        template=("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                  "Question: Find all variables that are assigned the value {query} in the text above."),
        answer_prefix=(" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                       "are assgined the value {query}, they are: "),
        max_new_tokens=30,
        metric="string_match_all",
    ),
    "common_words": Family(
        template=("Below is a numbered list of words. In these words, some appear more often than others. "
                  "Memorize the ones that appear most often.\n{context}\n"
                  "Question: What are the 10 most common words in the above list?"),
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
        max_new_tokens=120,
        metric="string_match_all",
    ),
    "freq_words": Family(
        template=("Read the following coded text and track the frequency of each coded word. Find the three most "
                  "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                  "the dots '....'. What are the three most frequently appeared words in the above coded text?"),
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
        max_new_tokens=50,
        metric="string_match_all",
    ),
    "qa": Family(
        template=("Answer the question based on the given documents. Only give me the answer and do not output any "
                  "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
                  "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"),
        answer_prefix=" Answer:",
        max_new_tokens=32,
        metric="string_match_part",
    ),
}


@dataclass(frozen=True)
class TaskSpec:
    family: str
    params: dict[str, Any] = field(default_factory=dict)


def _niah(haystack: str, key: str, value: str, keys: int = 1, values: int = 1, queries: int = 1) -> TaskSpec:
    return TaskSpec("niah", {"haystack": haystack, "key_type": key, "value_type": value,
                             "num_keys": keys, "num_values": values, "num_queries": queries})


# RULER's scripts/synthetic.yaml, in its order.
TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", values=4),
    "niah_multiquery": _niah("essay", "words", "numbers", keys=4, queries=4),
    "vt": TaskSpec("variable_tracking", {"num_chains": 1, "num_hops": 4}),
    "cwe": TaskSpec("common_words", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": TaskSpec("freq_words", {"alpha": 2.0}),
    "qa_1": TaskSpec("qa", {"dataset": "squad"}),
    "qa_2": TaskSpec("qa", {"dataset": "hotpotqa"}),
}

QA_TASKS = tuple(name for name, spec in TASKS.items() if spec.family == "qa")


def family_of(task: str) -> Family:
    return FAMILIES[TASKS[task].family]
