"""LongBench v1 (and LongBench-E) as a rocketkv task: official prompts, generation lengths, metrics and averages."""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

from evals.base import Sample, Task, int_option
from evals.longbench.data import DataSource, check_data_dir, file_sha256, load_hub_rows, load_jsonl_rows
from evals.longbench.metrics import JIEBA_MISSING, METRICS_NEEDING_JIEBA, SUBSET_METRICS, classification_score
from evals.longbench.prompts import (CATEGORIES, DEFAULT_SUBSETS, ENGLISH_SUBSETS, FIRST_LINE_SUBSETS,
                                     LB_AVG_EXCLUDED, LENGTH_BUCKETS, MAX_NEW_TOKENS, NO_CHAT_TEMPLATE,
                                     PROMPT_TEMPLATES, STOP_STRINGS, VARIANTS, build_prompt, first_line,
                                     length_bucket, question_part)

DEFAULT_HUB_REPO = "Xnhyacinth/LongBench"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class LongBenchTask(Task):
    name = "longbench"
    limit_scope = "subtask"
    splits_questions = True  # every template's part after {context} (docs/tasks.md)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.variant = str(cfg.get("variant", "standard"))
        self.source = DataSource(
            data_dir=os.path.expanduser(str(cfg.get("data_dir"))) if cfg.get("data_dir", None) else None,
            hub_repo=cfg.get("hub_repo", None) or DEFAULT_HUB_REPO,
            hub_revision=cfg.get("hub_revision", None) or None,
            hub_split=cfg.get("hub_split", None) or "test",
            cache_dir=cfg.get("cache_dir", None) or None,
        )
        cap = cfg.get("max_new_tokens", None)
        self.max_new_tokens = None if cap is None else int_option("max_new_tokens", cap, 1)
        self._rows: dict[str, list[dict]] | None = None
        self._file_hashes: dict[str, str] | None = None

    # ------------------------------------------------------------ settings
    def subsets(self) -> list[str]:
        """The chosen subsets in a fixed order (as given, duplicates dropped); raises for unknown ones."""
        if self.variant not in VARIANTS:
            raise ValueError(f"task.variant={self.variant!r} is not valid; use one of {sorted(VARIANTS)} "
                             f"(e = LongBench-E)")
        requested = self.cfg.get("subsets", None)
        if requested is None:
            return list(DEFAULT_SUBSETS[self.variant])
        names = [requested] if isinstance(requested, str) else [str(s) for s in requested]
        if not names:
            raise ValueError("task.subsets is empty; leave it null for the default subsets")
        valid = VARIANTS[self.variant]
        unknown = [s for s in names if s not in valid]
        if unknown:
            raise ValueError(f"unknown LongBench subset(s) {unknown} for task.variant={self.variant}; valid: "
                             f"{list(valid)}")
        return list(dict.fromkeys(names))

    def new_tokens(self, subset: str) -> int:
        """The subset's official generation length, capped by ``task.max_new_tokens`` (a quick run) when set."""
        official = MAX_NEW_TOKENS[subset]
        return official if self.max_new_tokens is None else min(official, self.max_new_tokens)

    def _check_jieba(self, subsets: list[str]) -> None:
        needing = [s for s in subsets if SUBSET_METRICS[s] in METRICS_NEEDING_JIEBA]
        if needing and importlib.util.find_spec("jieba") is None:
            raise ValueError(f"subsets {needing}: {JIEBA_MISSING}")

    # ------------------------------------------------------------ data
    def _load_rows(self) -> dict[str, list[dict]]:
        if self._rows is None:
            subsets = self.subsets()
            self._check_jieba(subsets)
            rows = {}
            if self.source.data_dir:
                files = check_data_dir(self.source.data_dir, subsets, self.variant)
                for subset, path in files.items():
                    rows[subset] = load_jsonl_rows(path, SUBSET_METRICS[subset] is classification_score,
                                                   self.source.cache_dir)
            else:
                for subset in subsets:
                    rows[subset] = load_hub_rows(self.source, subset, self.variant,
                                                 SUBSET_METRICS[subset] is classification_score)
            self._rows = rows
        return self._rows

    def validate(self, model_max_len: int) -> None:
        subsets = self.subsets()
        self._check_jieba(subsets)
        too_long = {s: self.new_tokens(s) for s in subsets if self.new_tokens(s) >= model_max_len}
        if too_long:
            raise ValueError(f"model max length {model_max_len} leaves no room for the prompt of subsets generating "
                             f"{too_long} new tokens")
        self._load_rows()

    def samples(self, tokenizer: Any, model_max_len: int) -> list[Sample]:
        # The runner truncates in the middle and applies the chat template; the tokenizer is not needed here.
        out = []
        for subset, rows in self._load_rows().items():
            for row in rows:
                out.append(Sample(
                    id=f"{subset}/{row['_id']}",
                    prompt=build_prompt(subset, row["context"], row["input"]),
                    references=list(row["answers"]),
                    max_new_tokens=self.new_tokens(subset),
                    chat_template=subset not in NO_CHAT_TEMPLATE,
                    stop=list(STOP_STRINGS.get(subset, [])),
                    subtask=subset,
                    meta={"length": row["length"], "all_classes": row["all_classes"], "language": row["language"]},
                    question=question_part(subset, row["input"]),
                ))
        return out

    # ------------------------------------------------------------ scoring
    def score(self, sample: Sample, prediction: str) -> float:
        subset = sample.subtask
        if subset in FIRST_LINE_SUBSETS:
            prediction = first_line(prediction)
        metric = SUBSET_METRICS[subset]
        all_classes = sample.meta.get("all_classes")
        best = 0.0
        for reference in sample.references:
            best = max(best, metric(prediction, reference, all_classes=all_classes))
        return 100.0 * best

    def aggregate(self, records: list[dict]) -> dict:
        scores_by_task: dict[str, list[float]] = {}
        for r in records:
            scores_by_task.setdefault(r["subtask"], []).append(float(r["score"]))
        order = {name: i for i, name in enumerate(VARIANTS["standard"])}
        tasks = sorted(scores_by_task, key=lambda t: (order.get(t, len(order)), t))
        subtasks = {t: {"score": _mean(scores_by_task[t]), "n": len(scores_by_task[t])} for t in tasks}

        categories = {}
        for category, members in CATEGORIES.items():
            present = [subtasks[t]["score"] for t in members if t in subtasks]
            if present:
                categories[category] = _mean(present)

        lb_avg = _mean([s["score"] for t, s in subtasks.items() if t in ENGLISH_SUBSETS and t not in LB_AVG_EXCLUDED])
        mean_all = _mean([s["score"] for s in subtasks.values()])
        result = {"score": mean_all if math.isnan(lb_avg) else lb_avg, "subtasks": subtasks,
                  "categories": categories, "lb_avg": lb_avg, "mean_all": mean_all}
        if self.variant == "e":
            result["length_buckets"] = self._length_buckets(records, subtasks)
        return result

    @staticmethod
    def _length_buckets(records: list[dict], subtasks: dict[str, dict]) -> dict:
        """Per task and bucket (official eval.py with --e), then each bucket's mean over the tasks that have it."""
        by_task_bucket: dict[str, dict[str, list[float]]] = {}
        for r in records:
            bucket = length_bucket(int(r["meta"]["length"]))
            by_task_bucket.setdefault(r["subtask"], {}).setdefault(bucket, []).append(float(r["score"]))
        for task, summary in subtasks.items():
            buckets = by_task_bucket.get(task, {})
            summary["length_buckets"] = {name: {"score": _mean(buckets[name]), "n": len(buckets[name])}
                                         for name, _, _ in LENGTH_BUCKETS if name in buckets}
        overall = {}
        for name, _, _ in LENGTH_BUCKETS:
            per_task = [s["length_buckets"][name]["score"] for s in subtasks.values() if name in s["length_buckets"]]
            if per_task:
                overall[name] = {"score": _mean(per_task), "n_tasks": len(per_task)}
        return overall

    # ------------------------------------------------------------ protocol
    def _data_protocol(self, subsets: list[str]) -> dict:
        if self.source.data_dir:
            if self._file_hashes is None:
                files = check_data_dir(self.source.data_dir, subsets, self.variant)
                self._file_hashes = {subset: file_sha256(path) for subset, path in files.items()}
            return {"source": "jsonl", "sha256": self._file_hashes}
        return {"source": "hub", "repo": self.source.hub_repo, "revision": self.source.hub_revision,
                "split": self.source.hub_split}

    def protocol(self) -> dict:
        subsets = self.subsets()
        return {
            "task": self.name,
            "variant": self.variant,
            "subsets": subsets,
            "templates": {s: PROMPT_TEMPLATES[s] for s in subsets},
            "max_new_tokens": {s: self.new_tokens(s) for s in subsets},
            "chat_template": {s: s not in NO_CHAT_TEMPLATE for s in subsets},
            "stop": {s: STOP_STRINGS.get(s, []) for s in subsets},
            "first_line_only": [s for s in subsets if s in FIRST_LINE_SUBSETS],
            "metrics": {s: SUBSET_METRICS[s].__name__ for s in subsets},
            "sample_score": "100 * max over references",
            "truncation": "middle of the raw prompt to model_max_len - max_new_tokens - template tokens, "
                          "before the chat template (evals.prompting)",
            "lb_avg": "mean of the English task scores present, excluding " + ", ".join(sorted(LB_AVG_EXCLUDED)),
            "data": self._data_protocol(subsets),
        }
