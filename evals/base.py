"""The contract every task implements.

A task turns its config into a deterministic list of ``Sample`` objects, scores one prediction at a time and
aggregates the scored records of a run into ``metrics.json`` fields.  The runner owns tokenisation of the final
prompt, middle truncation to the model's context, the chat template, generation and the results files; a task
never sees a KV method.  A task that needs exact token ids (``task=efficiency``) gives them in ``prompt_ids``.

A multi-turn task (``multi_turn = True``) gives conversations: a sample's ``prompt`` is the shared context and its
``turns`` the questions asked one after another; the runner feeds each turn after the previous answer onto one
carried cache, scores each answer with ``score_turn`` and writes one record per conversation with its turns.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Turn:
    """One turn of a conversation: its text (fed after the history: the context, earlier turns and answers)."""

    prompt: str
    references: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    id: str  # unique within the task and stable across runs (resume keys on it)
    prompt: str  # text before the chat template
    references: list[str]
    max_new_tokens: int
    chat_template: bool = False  # wrap in the model's chat template (when the model has one)
    stop: list[str] = field(default_factory=list)  # generation stops at the first one; it is cut from the output
    subtask: str = ""  # LongBench subset, RULER task, needle cell ...
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras the scorer and report use
    answer_prefix: str = ""  # text appended after the chat template (RULER's answer prefixes)
    # exact prompt token ids, used as they are (no template, no truncation); a list of equal-length rows is a batch
    prompt_ids: list[int] | list[list[int]] | None = None
    # a conversation (multi-turn tasks): ``prompt`` is the shared context, each turn decodes ``max_new_tokens``
    turns: list[Turn] | None = None
    # a conversation's budget plan: from the first turn and one answer (SCBench's official runs), else the whole
    plan_first_turn: bool = False
    # the end of ``prompt`` after the context (the question, and any instruction after the context): what the
    # query-agnostic mode (``task.query_aware=false``) feeds only after the context's cache is compressed
    question: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def int_option(name: str, value: Any, least: int) -> int:
    """A task option that must be an integer ``>= least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"task.{name}={value!r} is not valid; give an integer >= {least}")
    return value


def int_list(name: str, value: Any, least: int, example: str) -> list[int]:
    """A task option that is one integer or a non-empty list of integers, each ``>= least``."""
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    if not items or any(isinstance(n, bool) or not isinstance(n, int) or n < least for n in items):
        raise ValueError(f"task.{name}={value!r} is not valid; give integers >= {least}, e.g. task.{name}={example}")
    return [int(n) for n in items]


def check_lengths_fit(lengths: list[int], max_new_tokens: int, model_max_len: int) -> None:
    """Prompt lengths (model tokens) plus the generated tokens must fit the model's context."""
    too_long = [n for n in lengths if n + max_new_tokens > model_max_len]
    if too_long:
        raise ValueError(f"task.lengths {too_long} plus {max_new_tokens} new tokens exceed the model's max length "
                         f"{model_max_len}; use lengths <= {model_max_len - max_new_tokens}")


class Task(ABC):
    """Base class for tasks. ``cfg`` is the task's config node (a plain dict or an OmegaConf DictConfig)."""

    name: str = ""
    # "task": ``limit=N`` runs the first N samples; "subtask": the first N of every subtask (LongBench, RULER).
    limit_scope: str = "task"
    # Decode every sample to exactly ``max_new_tokens`` (no stop at EOS), e.g. for speed measurements.
    ignore_eos: bool = False
    # What the headline ``score`` measures, as the runner prints it.
    score_name: str = "score"
    # The score says how well a model answers, so models with random weights (speed studies) are refused.
    measures_accuracy: bool = True
    # Samples are conversations (``Sample.turns``), scored per turn with ``score_turn``.
    multi_turn: bool = False
    # A conversation's next turn starts with the previous answer's last token, which the decode loop generated but
    # never fed (False: dropped, as SCBench's official runs do).
    feed_last_answer_token: bool = True
    # Its prompts can be split into context and question (``Sample.question``, or a conversation's context): the
    # task takes ``task.query_aware=false``.
    splits_questions: bool = False
    # How the model builds prompts (``evals.prompting.PromptFormat``), set by the runner before ``samples``; a task
    # that sizes its prompts in tokens (RULER) counts them this way.  None: the default rules.
    prompt_format: Any = None
    # The run's ``limit`` (samples per ``limit_scope``), set by the runner before ``samples``: a task that generates
    # its samples (RULER) need only make the first ``limit``.  None: all of them.
    limit: int | None = None

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @property
    def query_aware(self) -> bool:
        """``task.query_aware`` (default true): the question is in the prompt when the cache is compressed.  False:
        the context is prefilled and compressed first, then the question is fed on the compressed cache."""
        value = self.cfg.get("query_aware", True) if hasattr(self.cfg, "get") else True
        if not isinstance(value, bool):
            raise ValueError(f"task.query_aware={value!r} is not valid; use true or false")
        if not value and not self.splits_questions:
            raise ValueError(f"task.query_aware=false is not supported by task={self.name}; it is for tasks whose "
                             "prompts split into context and question (needle, longbench, ruler, multiturn)")
        return value

    def hashed_protocol(self) -> dict:
        """``protocol()``, plus the query-agnostic mode when it is on (so the two modes never share a protocol)."""
        return self.protocol() if self.query_aware else {**self.protocol(), "query_aware": False}

    def validate(self, model_max_len: int) -> None:
        """Raise ``ValueError`` for settings that cannot work with this model, before any model is loaded."""

    @abstractmethod
    def samples(self, tokenizer: Any, model_max_len: int) -> list[Sample]:
        """All samples of the task in a fixed order (the runner applies ``limit`` and sharding)."""

    @abstractmethod
    def score(self, sample: Sample, prediction: str) -> float:
        """Score of one prediction, 0-100."""

    def score_record(self, sample: Sample, record: dict) -> float:
        """Score of one finished prediction record (text, token counts, timings, the method's statistics).

        The default scores the prediction text; a task that scores something else (speed) overrides this.
        """
        return self.score(sample, record["prediction"])

    def score_turn(self, sample: Sample, turn: int, prediction: str) -> float:
        """Score of the answer to ``sample.turns[turn]``, 0-100 (multi-turn tasks)."""
        raise NotImplementedError(f"task {self.name!r} is not multi-turn")

    def aggregate(self, records: list[dict]) -> dict:
        """Fields for ``metrics.json`` from the scored prediction records of a run.

        Must contain ``score`` (the headline number: 0-100 for accuracy tasks, else what ``score_name`` says) and ``subtasks`` (``{name: {"score", "n"}}``).
        The default is the mean over subtasks of the mean per subtask.
        """
        return mean_over_subtasks(records)

    def context(self, model) -> dict:
        """Facts about the loaded model and its device that the task's numbers need (measured once per run, saved
        in every cell's ``metrics.json`` under ``context``); none by default."""
        return {}

    def protocol(self) -> dict:
        """Everything that defines the task's prompts and scoring; hashed into every result."""
        return {"task": self.name}

    def metrics_line(self, metrics: dict) -> str:
        """More of a cell's ``metrics.json`` for the runner's one-line summary (after the headline score)."""
        return ""

    def summary(self, results: list[dict]) -> str | None:
        """A text table the runner prints at the end of a run, from the ``metrics.json`` of every cell of the run
        (each with its ``run`` info: method, budget, ``reference`` for the full-KV cell); None prints nothing."""
        return None


def mean_over_subtasks(records: list[dict]) -> dict:
    by_sub: dict[str, list[float]] = {}
    for r in records:
        by_sub.setdefault(r.get("subtask", ""), []).append(float(r["score"]))
    subtasks = {k: {"score": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_sub.items())}
    score = sum(s["score"] for s in subtasks.values()) / len(subtasks) if subtasks else float("nan")
    return {"score": score, "subtasks": subtasks}


def mean_over_turns(records: list[dict]) -> dict:
    """Conversations' records: the headline is the mean over every turn of every conversation; ``subtasks`` holds
    the mean per turn index (``turn1``, ``turn2``, ...; prefixed with the sample's subtask when it has one) and
    per subtask."""
    groups: dict[str, list[float]] = {}
    every = []
    for r in records:
        sub = r.get("subtask", "")
        for i, turn in enumerate(r["turns"]):
            score = float(turn["score"])
            every.append(score)
            groups.setdefault(f"{sub}/turn{i + 1}" if sub else f"turn{i + 1}", []).append(score)
            if sub:
                groups.setdefault(sub, []).append(score)
    subtasks = {k: {"score": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}
    return {"score": sum(every) / len(every) if every else float("nan"), "subtasks": subtasks,
            "n_turns": len(every)}


def stable_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
