"""Per task x model pivot tables (method x budget) of the headline score, as CSV and markdown."""
from __future__ import annotations

import importlib.util
import re

import pandas as pd

from rocketkv.harness.report.collect import NO_BUDGET, is_reference
from rocketkv.harness.report.leaderboard import one_run_per_cell


def budget_label(budget) -> str:
    return NO_BUDGET if pd.isna(budget) else str(int(budget))


def file_stem(*parts: str) -> str:
    """``task__model`` with characters unsafe in file names replaced."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", str(part)) for part in parts)


def score_pivots(leaderboard: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """``{(task, model): method x budget table of scores}``; budgets ascending, ``none`` (full KV) last."""
    pivots = {}
    for (task, model), runs in one_run_per_cell(leaderboard).groupby(["task", "model"], sort=True):
        budgets = sorted(runs["budget"].dropna().unique())
        columns = [budget_label(b) for b in budgets] + ([NO_BUDGET] if runs["budget"].isna().any() else [])
        reference = set(runs.loc[is_reference(runs["method"]), "method"])
        methods = sorted(runs["method"].unique(), key=lambda m: (m not in reference, m))
        pivot = (
            runs.assign(budget=runs["budget"].map(budget_label))
            .pivot(index="method", columns="budget", values="score")
            .reindex(index=methods, columns=columns)
        )
        pivot.columns.name = "budget"
        pivots[(task, model)] = pivot
    return pivots


def has_tabulate() -> bool:
    return importlib.util.find_spec("tabulate") is not None


def plain_markdown(table: pd.DataFrame, float_format: str = "{:.2f}") -> str:
    """A pipe table, for when ``tabulate`` (needed by ``DataFrame.to_markdown``) is not installed."""
    def cell(value) -> str:
        if pd.isna(value):
            return ""
        return float_format.format(value) if isinstance(value, float) else str(value)

    header = [str(table.index.name or "")] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index)] + [cell(v) for v in row]) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(table: pd.DataFrame) -> str:
    if has_tabulate():
        # tabulate only blanks None, not NaN
        return table.astype(object).where(table.notna(), None).to_markdown(floatfmt=".2f", missingval="") + "\n"
    return plain_markdown(table)
