"""Walk ``<root>/runs/<task>/<model>/<method>/<budget>/<config_hash>/`` into data frames.

``load_results`` returns a :class:`Results` with

* ``runs``: one row per run folder (keys, headline score, sample counts, completeness, missing shards, stat and
  timing means, protocol hash, code version, where the score came from);
* ``samples``: one row per prediction line, with its folder's keys (the input of the paired bootstrap);
* ``warnings``: one line per problem found (corrupt line, missing metrics.json, missing shard, ...).

Broken parts are skipped, never fatal: a truncated or malformed line drops that line only, a missing
``metrics.json`` makes the run's numbers come from its predictions, a folder with neither is skipped.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rocketkv.core import METHODS
from rocketkv.harness.cells import QUERY_AGNOSTIC
from rocketkv.harness.report.frames import STAT_COLUMNS, tidy_frame
from rocketkv.harness.report.readers import read_json, read_jsonl, read_yaml

log = logging.getLogger(__name__)

RUN_KEYS = ["task", "model", "method", "budget", "config_hash"]
NO_BUDGET = "none"  # folder name of methods that ignore the budget

UNSHARDED_FILE = "predictions.jsonl"
SHARD_FILE = re.compile(r"^predictions\.shard-(\d+)-of-(\d+)\.jsonl$")

SAMPLE_COLUMNS = [
    *RUN_KEYS, "id", "subtask", "length", "depth", "prompt_tokens", "score", "new_tokens",
    "time_prefill_s", "time_decode_s", "peak_mem_bytes", *STAT_COLUMNS, "protocol_hash", "code_version",
]
RUN_COLUMNS = [
    *RUN_KEYS, "query_aware", "score", "score_source", "n_samples", "n_predictions", "n_expected", "complete",
    "n_shards", "missing_shards", *STAT_COLUMNS, "prefill_s_mean", "decode_s_mean", "decode_tokens_per_s",
    "peak_mem_bytes_max", "protocol_hash", "code_version", "path",
]


def is_reference(methods: pd.Series) -> pd.Series:
    """Whether each method is the dense baseline the others are compared with (the method says so itself)."""
    return methods.map(lambda name: name in METHODS and METHODS[name].is_reference).astype(bool)


@dataclass(frozen=True)
class RunFolder:
    path: Path
    task: str
    model: str
    method: str
    budget: int | None
    config_hash: str


@dataclass
class Predictions:
    records: list[dict]
    n_shards: int | None  # None for an unsharded run
    missing_shards: list[int]


@dataclass
class Results:
    runs: pd.DataFrame
    samples: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    @property
    def tidy(self) -> pd.DataFrame:
        return tidy_frame(self.samples)


def find_run_folders(root: Path) -> tuple[list[RunFolder], list[str]]:
    folders, warnings = [], []
    for path in sorted(p for p in (Path(root) / "runs").glob("*/*/*/*/*") if p.is_dir()):
        config_hash, budget_name, method, model, task = (path.name, *(p.name for p in path.parents[:4]))
        if budget_name == NO_BUDGET:
            budget = None
        elif budget_name.isdigit():
            budget = int(budget_name)
        else:
            warnings.append(f"{path}: budget folder {budget_name!r} is neither an integer nor 'none', skipped")
            continue
        folders.append(RunFolder(path, task, model, method, budget, config_hash))
    return folders, warnings


def read_predictions(path: Path) -> tuple[Predictions, list[str]]:
    """All prediction records of a folder, shard files merged by ``id`` (first occurrence wins)."""
    warnings: list[str] = []
    files, shards_present, shard_counts = [], set(), set()
    if (path / UNSHARDED_FILE).exists():
        files.append(path / UNSHARDED_FILE)
    for shard_file in sorted(path.glob("predictions.shard-*.jsonl")):
        match = SHARD_FILE.match(shard_file.name)
        if not match:
            warnings.append(f"{shard_file}: unrecognised shard file name, skipped")
            continue
        files.append(shard_file)
        shards_present.add(int(match[1]))
        shard_counts.add(int(match[2]))
    records, seen = [], set()
    for file in files:
        file_records, file_warnings = read_jsonl(file)
        warnings += file_warnings
        for record in file_records:
            key = str(record["id"])
            if key in seen:
                warnings.append(f"{file}: duplicate id {key!r} skipped")
                continue
            seen.add(key)
            records.append(record)
    n_shards, missing = None, []
    if shard_counts:
        if len(shard_counts) > 1:
            warnings.append(f"{path}: shard files disagree on the shard count {sorted(shard_counts)}")
        n_shards = max(shard_counts)
        missing = sorted(set(range(n_shards)) - shards_present)
        if missing:
            warnings.append(f"{path}: missing shards {missing} of {n_shards}")
    return Predictions(records, n_shards, missing), warnings


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def sample_rows(folder: RunFolder, records: list[dict], run_info: dict) -> list[dict]:
    rows = []
    for record in records:
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        stats = record.get("stats") if isinstance(record.get("stats"), dict) else {}
        rows.append({
            "task": folder.task, "model": folder.model, "method": folder.method, "budget": folder.budget,
            "config_hash": folder.config_hash,
            "id": str(record["id"]),
            "subtask": str(record.get("subtask", "")),
            "length": _number(meta.get("length")),
            "depth": _number(meta.get("depth")),
            "prompt_tokens": _number(record.get("prompt_tokens")),
            "score": _number(record.get("score")),
            "new_tokens": _number(record.get("new_tokens")),
            "time_prefill_s": _number(record.get("time_prefill_s")),
            "time_decode_s": _number(record.get("time_decode_s")),
            "peak_mem_bytes": _number(record.get("peak_mem_bytes")),
            **{name: _number(stats.get(name)) for name in STAT_COLUMNS},
            "protocol_hash": run_info.get("protocol_hash"),
            "code_version": run_info.get("code_version"),
        })
    return rows


def headline_from_samples(samples: pd.DataFrame) -> float:
    """Mean over subtasks of the per-subtask mean (the default task aggregate), for runs without metrics.json."""
    if samples.empty:
        return math.nan
    return float(samples.groupby("subtask")["score"].mean().mean())


def timing_from_samples(samples: pd.DataFrame) -> dict:
    if samples.empty:
        return {}
    decode_s = samples["time_decode_s"].sum()
    return {
        "prefill_s_mean": samples["time_prefill_s"].mean(),
        "decode_s_mean": samples["time_decode_s"].mean(),
        "decode_tokens_per_s": samples["new_tokens"].sum() / decode_s if decode_s > 0 else math.nan,
        "peak_mem_bytes_max": samples["peak_mem_bytes"].max(),
    }


def run_row(folder: RunFolder, metrics: dict | None, predictions: Predictions, samples: pd.DataFrame) -> dict:
    metrics = metrics or {}
    run_info = metrics.get("run") if isinstance(metrics.get("run"), dict) else {}
    metric_stats = metrics.get("stats") if isinstance(metrics.get("stats"), dict) else {}
    metric_timing = metrics.get("timing") if isinstance(metrics.get("timing"), dict) else {}
    sample_timing = timing_from_samples(samples)

    score, source = _number(metrics.get("score")), "metrics"
    if math.isnan(score):
        score, source = headline_from_samples(samples), "predictions"
    n_samples = metrics.get("n_samples")
    if not isinstance(n_samples, int):
        n_samples = len(samples)
    stats = {
        name: _number(metric_stats[name]) if name in metric_stats
        else (samples[name].mean() if not samples.empty else math.nan)
        for name in STAT_COLUMNS
    }
    timing = {
        name: _number(metric_timing[name]) if name in metric_timing else sample_timing.get(name, math.nan)
        for name in ("prefill_s_mean", "decode_s_mean", "decode_tokens_per_s", "peak_mem_bytes_max")
    }
    return {
        "task": folder.task, "model": folder.model, "method": folder.method, "budget": folder.budget,
        "config_hash": folder.config_hash,
        "query_aware": not folder.task.endswith(QUERY_AGNOSTIC),
        "score": score,
        "score_source": source,
        "n_samples": n_samples,
        "n_predictions": len(samples),
        "n_expected": run_info.get("n_expected"),
        "complete": bool(run_info.get("complete", False)) and not predictions.missing_shards,
        "n_shards": predictions.n_shards,
        "missing_shards": ",".join(map(str, predictions.missing_shards)),
        **stats,
        **timing,
        "protocol_hash": run_info.get("protocol_hash"),
        "code_version": run_info.get("code_version"),
        "path": str(folder.path),
    }


def _typed(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    frame = frame.reindex(columns=columns)
    frame["budget"] = frame["budget"].astype("Int64")
    return frame


def load_results(root: str | Path) -> Results:
    root = Path(root)
    folders, warnings = find_run_folders(root)
    run_rows, sample_frames = [], []
    for folder in folders:
        metrics, metric_warnings = read_json(folder.path / "metrics.json")
        predictions, prediction_warnings = read_predictions(folder.path)
        warnings += prediction_warnings
        if metrics is None and not predictions.records:
            warnings.append(f"{folder.path}: no metrics.json and no readable predictions, skipped")
            continue
        warnings += metric_warnings
        if (folder.path / "config.yaml").exists():
            warnings += read_yaml(folder.path / "config.yaml")[1]
        else:
            warnings.append(f"{folder.path}: config.yaml missing (the cell's own command, run again, writes it)")
        run_info = (metrics or {}).get("run") or {}
        samples = pd.DataFrame(sample_rows(folder, predictions.records, run_info), columns=SAMPLE_COLUMNS)
        sample_frames.append(samples)
        run_rows.append(run_row(folder, metrics, predictions, samples))
    for warning in warnings:
        log.warning(warning)
    sample_frames = [frame for frame in sample_frames if not frame.empty]
    samples = pd.concat(sample_frames, ignore_index=True) if sample_frames else pd.DataFrame(columns=SAMPLE_COLUMNS)
    return Results(_typed(pd.DataFrame(run_rows), RUN_COLUMNS), _typed(samples, SAMPLE_COLUMNS), warnings)


def collect_results(root: str | Path) -> pd.DataFrame:
    """The tidy frame (see :func:`rocketkv.harness.report.frames.tidy_frame`); warnings are logged."""
    return load_results(root).tidy
