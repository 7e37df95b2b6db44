"""The leaderboard: one row per model x task x method x budget x config hash.

``leaderboard.csv`` / ``leaderboard.parquet`` columns, in this order:

==========================  =========================================================================================
``task``                    task name (folder name under ``runs/``; ``<task>.query_agnostic`` in that mode)
``model``                   model name
``method``                  KV method (``full`` is the uncompressed reference)
``budget``                  token budget; empty/NA for methods that ignore it (folder ``none``)
``config_hash``             hash of the resolved config (one folder per hash)
``query_aware``             false for the query-agnostic mode (``task.query_aware=false``: context compressed before
                            the question is seen); its runs are their own task, compared with full KV in that mode
``score``                   headline score 0-100: ``metrics.json`` ``score``, else recomputed from the predictions
                            as the mean over subtasks of the per-subtask mean
``score_source``            ``metrics`` or ``predictions`` (where ``score`` came from)
``n_samples``               samples scored (``metrics.json`` ``n_samples``, else readable prediction lines)
``n_expected``              samples the run was meant to score (``metrics.json`` ``run.n_expected``), NA if unknown
``complete``                the run says it finished and no shard file is missing
``missing_shards``          comma-separated indices of absent shard files, empty when none
``delta_vs_full``           mean over shared sample ids of (this run's score - the full-KV run's score)
``delta_ci_low``            2.5th percentile of the paired bootstrap of ``delta_vs_full`` (ids resampled with
                            replacement, fixed seed)
``delta_ci_high``           97.5th percentile of the same bootstrap
``n_paired``                sample ids shared with the full-KV run (the bootstrap's sample size)
``full_score``              headline score of the full-KV run used as reference
``full_config_hash``        config hash of that full-KV run
``kept_tokens``             mean KV tokens kept per sample
``attended_tokens``         mean KV tokens attended per decode step
``bytes_read_per_step``     mean KV bytes read per decode step
``elements_read_per_step``  mean KV elements read per decode step
``stored_kv_bytes``         mean bytes of KV cache stored
``prefill_s_mean``          mean prefill time per sample, seconds
``decode_s_mean``           mean decode time per sample, seconds
``decode_tokens_per_s``     generated tokens per second of decode
``peak_mem_bytes_max``      largest peak device memory over the samples
``protocol_hash``           hash of the task protocol (prompts, scoring)
``code_version``            code version recorded by the runner
``path``                    the run folder
==========================  =========================================================================================

The delta columns are NaN when the model x task has no full-KV run or no shared ids. When several full-KV runs
exist for a model x task, the reference is the one with the same protocol hash, then the most samples, then the
last config hash in sort order.
"""
from __future__ import annotations

import math

import pandas as pd

from rocketkv.harness.report.bootstrap import paired_bootstrap_ci, paired_differences
from rocketkv.harness.report.collect import RUN_KEYS, STAT_COLUMNS, is_reference

LEADERBOARD_COLUMNS = [
    *RUN_KEYS, "query_aware", "score", "score_source", "n_samples", "n_expected", "complete", "missing_shards",
    "delta_vs_full", "delta_ci_low", "delta_ci_high", "n_paired", "full_score", "full_config_hash",
    *STAT_COLUMNS, "prefill_s_mean", "decode_s_mean", "decode_tokens_per_s", "peak_mem_bytes_max",
    "protocol_hash", "code_version", "path",
]


def choose_reference(full_runs: pd.DataFrame, protocol_hash) -> pd.Series | None:
    """The full-KV run to compare against (same protocol first, then most samples, then last config hash)."""
    if full_runs.empty:
        return None
    ranked = full_runs.assign(
        same_protocol=full_runs["protocol_hash"].eq(protocol_hash) if isinstance(protocol_hash, str) else False
    ).sort_values(["same_protocol", "n_samples", "config_hash"])
    return ranked.iloc[-1]


def sort_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Task, model, then full KV first, then methods alphabetically, budgets ascending."""
    order = frame.assign(is_budgeted=~is_reference(frame["method"]))
    order = order.sort_values(["task", "model", "is_budgeted", "method", "budget", "config_hash"], na_position="first")
    return frame.loc[order.index].reset_index(drop=True)


def build_leaderboard(
    runs: pd.DataFrame, samples: pd.DataFrame, n_resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    rows = []
    samples_by_run = {} if samples.empty else dict(tuple(samples.groupby(_run_labels(samples), sort=False)))
    empty = samples.iloc[0:0]
    for _, run in runs.iterrows():
        full_runs = runs[(runs["task"] == run["task"]) & (runs["model"] == run["model"])
                         & is_reference(runs["method"])]
        reference = choose_reference(full_runs, run["protocol_hash"])
        delta = {"delta_vs_full": math.nan, "delta_ci_low": math.nan, "delta_ci_high": math.nan, "n_paired": 0,
                 "full_score": math.nan, "full_config_hash": None}
        if reference is not None:
            differences = paired_differences(
                samples_by_run.get(_key_of(run), empty), samples_by_run.get(_key_of(reference), empty)
            )
            mean, low, high = paired_bootstrap_ci(differences, n_resamples=n_resamples, seed=seed)
            delta = {"delta_vs_full": mean, "delta_ci_low": low, "delta_ci_high": high,
                     "n_paired": len(differences), "full_score": reference["score"],
                     "full_config_hash": reference["config_hash"]}
        rows.append({**run.to_dict(), **delta})
    leaderboard = pd.DataFrame(rows).reindex(columns=LEADERBOARD_COLUMNS)
    if leaderboard.empty:
        return leaderboard
    leaderboard["budget"] = leaderboard["budget"].astype("Int64")
    leaderboard["n_expected"] = leaderboard["n_expected"].astype("Int64")
    return sort_runs(leaderboard)


def _label(task, model, method, budget, config_hash) -> str:
    return "/".join([task, model, method, "none" if pd.isna(budget) else str(int(budget)), config_hash])


def _run_labels(frame: pd.DataFrame) -> list[str]:
    return [_label(*keys) for keys in frame[RUN_KEYS].itertuples(index=False)]


def _key_of(run: pd.Series) -> str:
    return _label(*(run[key] for key in RUN_KEYS))


def one_run_per_cell(leaderboard: pd.DataFrame) -> pd.DataFrame:
    """Keep one run per task x model x method x budget (most samples, then last config hash) for tables and plots."""
    ranked = leaderboard.sort_values(["n_samples", "config_hash"])
    cell = ["task", "model", "method", "budget"]
    return sort_runs(ranked.drop_duplicates(subset=cell, keep="last"))
