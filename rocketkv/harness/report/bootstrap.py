"""Paired bootstrap confidence interval of a mean difference."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

MAX_DRAWS_PER_CHUNK = 2_000_000  # bounds memory: resamples are drawn in blocks of rows of this many indices


def paired_differences(scores: pd.DataFrame, reference: pd.DataFrame) -> pd.Series:
    """``score - reference score`` per sample id the two frames share (columns ``id``, ``score``), sorted by id."""
    paired = scores[["id", "score"]].merge(reference[["id", "score"]], on="id", suffixes=("", "_ref"))
    paired = paired.dropna(subset=["score", "score_ref"]).sort_values("id")
    return pd.Series((paired["score"] - paired["score_ref"]).to_numpy(), index=paired["id"].to_numpy())


def paired_bootstrap_ci(
    differences, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the per-id differences: resample ids with replacement, percentile interval.

    Resample ``b`` uses the ``b``-th row of ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))``.
    """
    values = np.asarray(differences, dtype=float)
    n = values.size
    if n == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, MAX_DRAWS_PER_CHUNK // n)
    means = []
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        means.append(values[rng.integers(0, n, size=(rows, n))].mean(axis=1))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)
