"""Rebuild the report files under the results root, safely when several runs finish at once.

Every writer takes ``<root>/.leaderboard.lock`` (a ``filelock.FileLock``) and writes each file through a temp
file in the same folder plus ``os.replace``, so readers never see a partial file and concurrent runners rebuild
one after another from the whole tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from filelock import FileLock

from rocketkv.harness.report.atomic import atomic_write, atomic_write_text
from rocketkv.harness.report.collect import Results, load_results
from rocketkv.harness.report.leaderboard import build_leaderboard
from rocketkv.harness.report.tables import file_stem, score_pivots, to_markdown

LOCK_NAME = ".leaderboard.lock"


@dataclass
class Report:
    leaderboard: pd.DataFrame
    results: Results
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def leaderboard_lock(root: str | Path) -> FileLock:
    Path(root).mkdir(parents=True, exist_ok=True)
    return FileLock(str(Path(root) / LOCK_NAME))


def _write_leaderboard_files(root: Path, leaderboard: pd.DataFrame) -> list[Path]:
    return [
        atomic_write(root / "leaderboard.csv", lambda temp: leaderboard.to_csv(temp, index=False)),
        atomic_write(root / "leaderboard.parquet", lambda temp: leaderboard.to_parquet(temp, index=False)),
    ]


def _write_tables(root: Path, leaderboard: pd.DataFrame) -> list[Path]:
    written = []
    for (task, model), pivot in score_pivots(leaderboard).items():
        stem = root / "tables" / file_stem(task, model)
        written.append(atomic_write(stem.with_suffix(".csv"), lambda temp, p=pivot: p.to_csv(temp)))
        written.append(atomic_write_text(stem.with_suffix(".md"), to_markdown(pivot)))
    return written


def write_leaderboard(
    root: str | Path = "results", leaderboard: pd.DataFrame | None = None, n_resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Write ``leaderboard.csv`` and ``leaderboard.parquet`` (built from the tree unless given) under the lock."""
    root = Path(root)
    with leaderboard_lock(root):
        if leaderboard is None:
            results = load_results(root)
            leaderboard = build_leaderboard(results.runs, results.samples, n_resamples=n_resamples, seed=seed)
        _write_leaderboard_files(root, leaderboard)
    return leaderboard


def update_leaderboard(
    root: str | Path = "results", plots: bool = True, n_resamples: int = 2000, seed: int = 0
) -> Report:
    """Rebuild leaderboard, tables and (optionally) plots from the whole tree; the runner calls this after a run."""
    root = Path(root)
    with leaderboard_lock(root):
        results = load_results(root)
        leaderboard = build_leaderboard(results.runs, results.samples, n_resamples=n_resamples, seed=seed)
        files = _write_leaderboard_files(root, leaderboard) + _write_tables(root, leaderboard)
        warnings = list(results.warnings)
        if plots:
            from rocketkv.harness.report.plots import write_plots  # matplotlib import is slow; only when plotting

            plot_files, plot_warnings = write_plots(leaderboard, results.samples, root / "plots")
            files += plot_files
            warnings += plot_warnings
    return Report(leaderboard, results, files, warnings)
