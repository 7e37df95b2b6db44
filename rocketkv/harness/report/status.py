"""Which cells of a grid spec are done, incomplete or missing.

The spec is a YAML mapping with lists ``tasks``, ``models``, ``methods``, ``budgets`` (the budgets apply to every
method except ``full``, whose only budget is ``none``) and an optional integer ``expected_samples``. A cell is
*done* when its best run folder has at least the expected samples (from the spec, else the run's
``n_expected``; with neither, when the run says it is complete) and no missing shard; *incomplete* when a folder
exists but falls short; *missing* when there is no folder.
"""
from __future__ import annotations

from itertools import product
from pathlib import Path

import pandas as pd
import yaml

from rocketkv.core import METHODS
from rocketkv.harness.report.collect import NO_BUDGET

STATUS_COLUMNS = ["task", "model", "method", "budget", "state", "n", "expected", "note"]


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_grid_spec(path: str | Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a grid spec must be a mapping with tasks, models, methods, budgets")
    return {
        "tasks": [str(t) for t in _as_list(spec.get("tasks"))],
        "models": [str(m) for m in _as_list(spec.get("models"))],
        "methods": [str(m) for m in _as_list(spec.get("methods"))],
        "budgets": [int(b) for b in _as_list(spec.get("budgets"))],
        "expected_samples": spec.get("expected_samples"),
    }


def expected_cells(spec: dict) -> list[tuple[str, str, str, int | None]]:
    cells = []
    for task, model, method in product(spec["tasks"], spec["models"], spec["methods"]):
        budgets = spec["budgets"] if method not in METHODS or METHODS[method].uses_budget else [None]
        cells += [(task, model, method, budget) for budget in budgets]
    return cells


def cell_status(runs: pd.DataFrame, expected_samples: int | None) -> dict:
    """State of one cell from its run folders (any config hash); the folder with the most samples counts."""
    if runs.empty:
        return {"state": "missing", "n": 0, "expected": expected_samples, "note": ""}
    runs = runs.assign(n=runs[["n_samples", "n_predictions"]].max(axis=1))
    best = runs.sort_values(["complete", "n"]).iloc[-1]
    expected = expected_samples if expected_samples is not None else best["n_expected"]
    expected = None if pd.isna(expected) else int(expected)
    notes = []
    if best["missing_shards"]:
        notes.append(f"missing shards {best['missing_shards']} of {int(best['n_shards'])}")
    if len(runs) > 1:
        notes.append(f"{len(runs)} config hashes")
    enough = best["n"] >= expected if expected is not None else bool(best["complete"])
    state = "done" if enough and not best["missing_shards"] else "incomplete"
    return {"state": state, "n": int(best["n"]), "expected": expected, "note": "; ".join(notes)}


def grid_status(runs: pd.DataFrame, spec: dict) -> pd.DataFrame:
    rows = []
    for task, model, method, budget in expected_cells(spec):
        matches = runs[(runs["task"] == task) & (runs["model"] == model) & (runs["method"] == method)]
        matches = matches[matches["budget"].isna()] if budget is None else matches[matches["budget"].eq(budget).fillna(False).astype(bool)]
        rows.append({"task": task, "model": model, "method": method,
                     "budget": NO_BUDGET if budget is None else str(budget),
                     **cell_status(matches, spec["expected_samples"])})
    status = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    status["expected"] = status["expected"].astype("Int64")
    return status


def format_status(status: pd.DataFrame) -> str:
    def describe(row) -> str:
        if row["state"] == "incomplete":
            of = "?" if pd.isna(row["expected"]) else str(row["expected"])
            return f"incomplete ({row['n']} of {of})"
        return row["state"]

    shown = status.assign(state=status.apply(describe, axis=1))[["task", "model", "method", "budget", "state", "note"]]
    counts = status["state"].value_counts()
    summary = ", ".join(f"{state} {int(counts.get(state, 0))}" for state in ("done", "incomplete", "missing"))
    return shown.to_string(index=False) + f"\n\n{len(status)} cells: {summary}\n"
