"""``task=ruler``: RULER's 13 standard tasks at one or more target lengths (NVIDIA/RULER, synthetic.yaml)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evals.base import Sample, Task, int_option, stable_hash
from evals.ruler.cache import SampleCache, tokenizer_fingerprint
from evals.ruler.common_words import CommonWordsGenerator
from evals.ruler.freq_words import FreqWordsGenerator
from evals.ruler.generation import generate_samples
from evals.ruler.niah import niah_template
from evals.ruler.haystack import prose_sha256
from evals.ruler.metrics import METRICS
from evals.ruler.niah import NiahGenerator
from evals.ruler.qa import QaGenerator
from evals.ruler.qa_sources import QuestionSet, load_question_set
from evals.ruler.templates import FAMILIES, QA_TASKS, TASKS, family_of
from evals.ruler.variable_tracking import VariableTrackingGenerator

log = logging.getLogger(__name__)

# Bump whenever generated prompts change for the same settings: it is part of every cache key and the protocol.
GENERATOR_VERSION = 1

SYNTHETIC_GENERATORS = {"niah": NiahGenerator, "variable_tracking": VariableTrackingGenerator,
                        "common_words": CommonWordsGenerator, "freq_words": FreqWordsGenerator}

DEFAULTS = {"max_seq_length": [4096], "num_samples": 50, "tasks": "all", "seed": 42,
            "cache_dir": "results/cache/ruler", "use_cache": True, "qa_dir": None, "qa_hub": True}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def parse_lengths(value: Any) -> list[int]:
    lengths = []
    for item in _as_list(value):
        try:
            length = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"task.max_seq_length={value!r}: {item!r} is not an integer") from None
        if length <= 0:
            raise ValueError(f"task.max_seq_length={value!r}: lengths must be positive")
        lengths.append(length)
    if not lengths:
        raise ValueError("task.max_seq_length is empty; give one length or a list, e.g. [4096, 8192]")
    return sorted(set(lengths))


def parse_tasks(value: Any) -> tuple[list[str], bool]:
    """The requested task names in RULER's order and whether the user listed them (``all`` is not a list)."""
    names = _as_list(value)
    if not names or names == ["all"]:
        return list(TASKS), False
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"task.tasks: unknown RULER task(s) {unknown}; valid: {list(TASKS)} (or 'all')")
    return [n for n in TASKS if n in names], True


def with_questions(samples: list[Sample]) -> list[Sample]:
    """Each sample with its ``question`` (for ``task.query_aware=false``): its prompt from the last occurrence of the
    template's fixed text after ``{context}`` (every RULER template has some) on; left empty if it is not found."""
    for s in samples:
        templates = [family_of(s.subtask).template]
        if TASKS[s.subtask].family == "niah":
            templates.append(niah_template(single_answer=True)[0])  # one needle: the question in the singular
        tails = [t.split("{context}", 1)[1] for t in templates]
        start = max(s.prompt.rfind(t.split("{", 1)[0]) for t in tails)
        s.question = s.prompt[start:] if start >= 0 else ""
    return samples


class RulerTask(Task):
    name = "ruler"
    limit_scope = "subtask"
    splits_questions = True  # the template's part after {context}

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        get = (lambda k: cfg.get(k, DEFAULTS[k])) if cfg is not None else DEFAULTS.get
        self.lengths = parse_lengths(get("max_seq_length"))
        self.requested, self.explicit = parse_tasks(get("tasks"))
        new_tokens = cfg.get("max_new_tokens", None) if cfg is not None else None
        self.max_new_tokens = None if new_tokens is None else int_option("max_new_tokens", new_tokens, 1)
        self.num_samples = int(get("num_samples"))
        if self.num_samples < 1:
            raise ValueError(f"task.num_samples={self.num_samples} must be at least 1")
        self.seed = int(get("seed"))
        self.cache = SampleCache(get("cache_dir")) if get("use_cache") and get("cache_dir") else None
        self.qa_dir = get("qa_dir")
        self.qa_hub = bool(get("qa_hub"))
        if self.qa_dir and not Path(str(self.qa_dir)).expanduser().is_dir():
            raise ValueError(f"task.qa_dir={self.qa_dir!r} is not a folder")
        self._question_sets: dict[str, QuestionSet] | None = None
        self._warned_missing = False

    # ------------------------------------------------------------------ setup
    def validate(self, model_max_len: int) -> None:
        too_long = [n for n in self.lengths if n > model_max_len]
        if too_long:
            raise ValueError(f"task.max_seq_length={too_long} exceeds the model's maximum length {model_max_len}")
        self.tasks()

    def question_sets(self) -> dict[str, QuestionSet]:
        if self._question_sets is None:
            wanted = {TASKS[t].params["dataset"] for t in self.requested if t in QA_TASKS}
            found = {name: load_question_set(name, self.qa_dir, self.qa_hub) for name in sorted(wanted)}
            self._question_sets = {name: qs for name, qs in found.items() if qs is not None}
        return self._question_sets

    def tasks(self) -> list[str]:
        """The requested tasks that can run; QA tasks without a source are skipped with a warning."""
        sets = self.question_sets()
        missing = [t for t in self.requested if t in QA_TASKS and TASKS[t].params["dataset"] not in sets]
        if missing:
            how = ("put dev-v2.0.json (SQuAD 2.0) and hotpotqa_dev.json (HotpotQA distractor dev) in a folder and "
                   "pass task.qa_dir=<folder>" + ("" if self.qa_dir else ", or make the Hugging Face hub reachable"))
            if len(missing) == len(self.requested):
                raise ValueError(f"RULER task(s) {missing} need SQuAD/HotpotQA and no source has them "
                                 f"(task.qa_dir={self.qa_dir!r}): {how}")
            if not self._warned_missing:
                log.warning("RULER: skipping %s: no SQuAD/HotpotQA source (task.qa_dir=%r); %s", missing,
                            self.qa_dir, how)
                self._warned_missing = True
        return [t for t in self.requested if t not in missing]

    # ------------------------------------------------------------------ samples
    def samples(self, tokenizer: Any, model_max_len: int) -> list[Sample]:
        self.validate(model_max_len)
        fingerprint = tokenizer_fingerprint(tokenizer)
        out: list[Sample] = []
        for length in self.lengths:
            for task in self.tasks():
                out.extend(self.task_samples(task, length, tokenizer, fingerprint))
        return out

    def cache_key(self, task: str, length: int, fingerprint: str) -> dict[str, Any]:
        source = (self.question_sets()[TASKS[task].params["dataset"]].fingerprint if task in QA_TASKS
                  else prose_sha256()[:16])
        key = {"task": task, "length": length, "tokenizer": fingerprint, "num_samples": self.num_samples,
               "seed": self.seed, "generator_version": GENERATOR_VERSION, "source": source}
        fmt = self.prompt_format
        if fmt is not None and (fmt.format, fmt.add_bos) != ("chat_template", "auto"):
            key["prompt_format"] = [fmt.format, fmt.add_bos]  # prompts sized for another format
        if self.max_new_tokens is not None:
            key["max_new_tokens"] = self.max_new_tokens
        return key

    def new_tokens(self, task: str) -> int:
        """Tokens generated for ``task``: ``task.max_new_tokens`` when set, else RULER's value for its family."""
        return self.max_new_tokens if self.max_new_tokens is not None else family_of(task).max_new_tokens

    def sample_count(self) -> int:
        """Samples per task and length this run takes: the first ``limit`` of ``num_samples``."""
        return self.num_samples if self.limit is None else min(self.limit, self.num_samples)

    def task_samples(self, task: str, length: int, tokenizer: Any, fingerprint: str) -> list[Sample]:
        """The first ``sample_count()`` samples (each sample's prompt depends only on those before it, so a
        shorter set is the start of the full one): from the full set's cache, from a cache of as many, or
        generated."""
        key = self.cache_key(task, length, fingerprint)
        count = self.sample_count()
        keys = [key] if count == self.num_samples else [key, {**key, "num_samples": count}]
        if self.cache is not None:
            for k in keys:
                cached = self.cache.load(k)
                if cached is not None:
                    return with_questions(cached[:count])
        log.info("RULER: generating %d samples of %s at %d tokens", count, task, length)
        samples = self.generate(task, length, tokenizer, count)
        if self.cache is not None:
            self.cache.store(keys[-1], samples)
        return with_questions(samples)

    def generate(self, task: str, length: int, tokenizer: Any, count: int | None = None) -> list[Sample]:
        spec = TASKS[task]
        if spec.family == "qa":
            questions = self.question_sets()[spec.params["dataset"]]
            if self.num_samples > len(questions.questions):
                raise ValueError(f"RULER {task}: task.num_samples={self.num_samples} but {questions.origin} has "
                                 f"only {len(questions.questions)} answerable questions")
            generator = QaGenerator(questions, length)
        else:
            generator = SYNTHETIC_GENERATORS[spec.family](spec.params, length)
        return generate_samples(task, generator, length, count or self.num_samples, self.seed, tokenizer,
                                self.new_tokens(task), self.prompt_format)

    # ------------------------------------------------------------------ scoring
    def score(self, sample: Sample, prediction: str) -> float:
        return METRICS[family_of(sample.subtask).metric](prediction, sample.references)

    def aggregate(self, records: list[dict]) -> dict:
        """Per length: mean per task, and their mean; headline: mean over lengths; per task: mean over lengths."""
        cells: dict[int, dict[str, list[float]]] = {}
        for r in records:
            length = int((r.get("meta") or {}).get("length") or str(r["id"]).split("/")[1])
            cells.setdefault(length, {}).setdefault(r["subtask"], []).append(float(r["score"]))
        by_length = {}
        for length, tasks in sorted(cells.items()):
            subtasks = {t: {"score": sum(v) / len(v), "n": len(v)} for t, v in tasks.items()}
            by_length[str(length)] = {"score": sum(s["score"] for s in subtasks.values()) / len(subtasks),
                                      "subtasks": dict(sorted(subtasks.items(), key=lambda kv: list(TASKS).index(kv[0])
                                                              if kv[0] in TASKS else 99))}
        per_task: dict[str, list] = {}
        for cell in by_length.values():
            for t, s in cell["subtasks"].items():
                per_task.setdefault(t, []).append(s)
        subtasks = {t: {"score": sum(s["score"] for s in v) / len(v), "n": sum(s["n"] for s in v)}
                    for t, v in per_task.items()}
        score = (sum(c["score"] for c in by_length.values()) / len(by_length)) if by_length else float("nan")
        return {"score": score, "subtasks": subtasks, "by_length": by_length}

    def protocol(self) -> dict:
        sets = self.question_sets()
        return {
            "task": self.name,
            "generator_version": GENERATOR_VERSION,
            "tasks": self.tasks(),
            "max_seq_length": self.lengths,
            "length_definition": "chat-templated prompt tokens + answer prefix + max_new_tokens <= max_seq_length",
            "num_samples": self.num_samples,
            "seed": self.seed,
            "task_specs": {t: {"family": TASKS[t].family, **TASKS[t].params} for t in TASKS},
            "templates": stable_hash({k: vars(f) for k, f in FAMILIES.items()}, 16),
            "max_new_tokens": {t: self.new_tokens(t) for t in TASKS},
            "metrics": {t: family_of(t).metric for t in TASKS},
            "haystack_sha256": prose_sha256()[:16],
            "qa_sources": {name: qs.fingerprint for name, qs in sorted(sets.items())},
        }
