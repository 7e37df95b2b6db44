"""The tidy frame: one row per model x task x subtask (x length x depth) x method x budget x config.

Columns: the run keys (``task, model, method, budget, config_hash``), the group keys (``subtask``, ``length``,
``depth``; NaN where the samples' meta lacks them), ``score`` (mean over the group's samples), ``n`` (samples),
the means of the achieved-compression stats (``kept_tokens``, ``attended_tokens``, ``bytes_read_per_step``,
``elements_read_per_step``, ``stored_kv_bytes``), ``prefill_s`` and ``decode_s`` (mean per sample),
``peak_mem_bytes`` (max), ``protocol_hash`` and ``code_version``.
"""
from __future__ import annotations

import pandas as pd

GROUP_KEYS = ["task", "model", "method", "budget", "config_hash", "subtask", "length", "depth"]
STAT_COLUMNS = ["kept_tokens", "attended_tokens", "bytes_read_per_step", "elements_read_per_step", "stored_kv_bytes"]
TIDY_COLUMNS = [
    *GROUP_KEYS, "score", "n", *STAT_COLUMNS, "prefill_s", "decode_s", "peak_mem_bytes", "protocol_hash",
    "code_version",
]


def tidy_frame(samples: pd.DataFrame) -> pd.DataFrame:
    if samples.empty:
        return pd.DataFrame(columns=TIDY_COLUMNS)
    grouped = samples.groupby(GROUP_KEYS, dropna=False, sort=True)
    tidy = grouped.agg(
        score=("score", "mean"),
        n=("id", "size"),
        **{name: (name, "mean") for name in STAT_COLUMNS},
        prefill_s=("time_prefill_s", "mean"),
        decode_s=("time_decode_s", "mean"),
        peak_mem_bytes=("peak_mem_bytes", "max"),
        protocol_hash=("protocol_hash", "first"),
        code_version=("code_version", "first"),
    ).reset_index()
    return tidy[TIDY_COLUMNS]
