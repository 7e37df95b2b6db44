"""Report figures (PNG and PDF under ``<root>/plots/``); each plot type is skipped when its data is absent.

* ``score_vs_budget__<task>__<model>``: score against budget (log2 axis), a line per method with a band from the
  paired bootstrap CI of the difference to full KV (centred on the score), full KV as a dashed horizontal line;
  the score axis and the bands stay within the metric's range (0-100 for accuracy scores).
* ``needle_heatmap__<task>__<model>``: mean score by depth x context length, a panel per method and budget
  (samples whose meta has both ``length`` and ``depth``).
* ``length_by_budget__<task>__<model>``: mean score by context length, a row per method and budget (RULER-style
  tasks: samples with ``length`` but no ``depth``).
* ``pareto__<task>__<model>``: score against the K/V MiB read per decode step, with the Pareto front.
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from rocketkv.harness.report.atomic import atomic_write  # noqa: E402
from rocketkv.harness.report.collect import RUN_KEYS, is_reference  # noqa: E402
from rocketkv.harness.report.leaderboard import one_run_per_cell  # noqa: E402
from rocketkv.harness.report.tables import budget_label, file_stem  # noqa: E402

log = logging.getLogger(__name__)
FORMATS = ("png", "pdf")
SCORE_COLORS = "RdYlGn"


def save_figure(figure: plt.Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    try:
        for fmt in FORMATS:
            paths.append(atomic_write(
                out_dir / f"{stem}.{fmt}", lambda temp, fmt=fmt: figure.savefig(temp, format=fmt, bbox_inches="tight")
            ))
    finally:
        plt.close(figure)
    return paths


def method_palette(methods) -> dict:
    methods = sorted(set(methods))
    return dict(zip(methods, sns.color_palette(n_colors=len(methods))))


SCORE_RANGE = (0.0, 100.0)  # accuracy scores; a task whose scores leave it (tok/s) is only kept >= 0
MIB = 2**20


def score_range(scores: pd.Series) -> tuple[float, float | None]:
    """The range of the metric these scores come from: 0-100 for accuracy scores, else [0, open)."""
    known = scores.dropna()
    if known.between(*SCORE_RANGE).all():
        return SCORE_RANGE
    return SCORE_RANGE[0], None


def _set_score_axis(axes: plt.Axes, bounds: tuple[float, float | None]) -> None:
    low, high = bounds
    if high is None:
        axes.set_ylim(bottom=low)
    else:
        margin = 0.03 * (high - low)  # markers at the bounds stay visible
        axes.set_ylim(low - margin, high + margin)


def score_vs_budget_figure(task: str, model: str, runs: pd.DataFrame) -> plt.Figure | None:
    budgeted = runs[runs["budget"].notna()].astype({"budget": float}).sort_values(["method", "budget"])
    if budgeted.empty:
        return None
    bounds = score_range(runs["score"])
    palette = method_palette(budgeted["method"])
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=budgeted, x="budget", y="score", hue="method", palette=palette, marker="o",
                 errorbar=None, ax=axes)
    for method, line in budgeted.groupby("method"):
        low = (line["score"] + line["delta_ci_low"] - line["delta_vs_full"]).clip(*bounds)
        high = (line["score"] + line["delta_ci_high"] - line["delta_vs_full"]).clip(*bounds)
        axes.fill_between(line["budget"], low, high, color=palette[method], alpha=0.2, linewidth=0)
    full = runs[is_reference(runs["method"])]
    if not full.empty:
        axes.axhline(full["score"].iloc[0], color="black", linestyle="--", linewidth=1, label="full KV")
    budgets = sorted(budgeted["budget"].unique())
    axes.set_xscale("log", base=2)
    axes.set_xticks(budgets, [str(int(b)) for b in budgets])
    axes.minorticks_off()
    _set_score_axis(axes, bounds)
    axes.set(xlabel="token budget", ylabel="score", title=f"{task} — {model}")
    axes.legend(fontsize="small")
    return figure


def plot_score_vs_budget(leaderboard: pd.DataFrame, out_dir: Path) -> list[Path]:
    written = []
    for (task, model), runs in leaderboard.groupby(["task", "model"], sort=True):
        figure = score_vs_budget_figure(task, model, runs)
        if figure is not None:
            written += save_figure(figure, out_dir, file_stem("score_vs_budget", task, model))
    return written


def _panel_labels(frame: pd.DataFrame) -> pd.Series:
    labels = frame["method"] + " @ " + frame["budget"].map(budget_label)
    return labels.where(~is_reference(frame["method"]), "full KV")


def _panel_order(frame: pd.DataFrame) -> list[str]:
    """Full KV first, then methods alphabetically with budgets ascending."""
    panels = frame[["method", "budget"]].drop_duplicates()
    panels = panels.assign(is_budgeted=~is_reference(panels["method"]), label=_panel_labels(panels))
    return panels.sort_values(["is_budgeted", "method", "budget"])["label"].tolist()


def _draw_heatmap(data: pd.DataFrame, **_ignored) -> None:
    table = data.pivot_table(index="depth", columns="length", values="score", aggfunc="mean").sort_index()
    sns.heatmap(table, vmin=0, vmax=100, cmap=SCORE_COLORS, cbar=False, ax=plt.gca())


def plot_needle_heatmaps(samples: pd.DataFrame, out_dir: Path) -> list[Path]:
    written = []
    needle = samples.dropna(subset=["length", "depth"])
    for (task, model), cells in needle.groupby(["task", "model"], sort=True):
        cells = cells.assign(panel=_panel_labels(cells), length=cells["length"].astype(int))
        order = _panel_order(cells)
        grid = sns.FacetGrid(cells, col="panel", col_order=order, col_wrap=min(4, len(order)), height=3,
                             sharex=False, sharey=False)
        grid.map_dataframe(_draw_heatmap)
        grid.set_titles("{col_name}")
        grid.figure.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, 100), cmap=SCORE_COLORS),
                             ax=grid.axes.ravel().tolist(), label="score")
        grid.figure.suptitle(f"{task} — {model}", y=1.02)
        written += save_figure(grid.figure, out_dir, file_stem("needle_heatmap", task, model))
    return written


def plot_length_by_budget(samples: pd.DataFrame, out_dir: Path) -> list[Path]:
    written = []
    with_length = samples.dropna(subset=["length"])
    for (task, model), cells in with_length.groupby(["task", "model"], sort=True):
        if cells["depth"].notna().any():
            continue  # needle-style task, drawn by plot_needle_heatmaps
        cells = cells.assign(row=_panel_labels(cells), length=cells["length"].astype(int))
        table = cells.pivot_table(index="row", columns="length", values="score", aggfunc="mean")
        table = table.reindex(_panel_order(cells))
        figure, axes = plt.subplots(figsize=(1.0 + 0.9 * table.shape[1], 1.2 + 0.35 * table.shape[0]))
        sns.heatmap(table, vmin=0, vmax=100, cmap=SCORE_COLORS, annot=True, fmt=".0f", ax=axes,
                    cbar_kws={"label": "score"})
        axes.set(xlabel="context length", ylabel="method @ budget", title=f"{task} — {model}")
        written += save_figure(figure, out_dir, file_stem("length_by_budget", task, model))
    return written


def pareto_front(points: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """Points no other point beats on both lower ``cost`` and higher ``value``."""
    ordered = points.sort_values([cost, value], ascending=[True, False])
    best_before = ordered[value].cummax().shift(fill_value=float("-inf"))
    return ordered[ordered[value] > best_before]


def pareto_figure(task: str, model: str, runs: pd.DataFrame) -> plt.Figure:
    """Score against the K/V MiB one decode step reads (log2 axis), a point per run labelled with its budget;
    the Pareto front joins the points no other beats on both (drawn when it has two or more)."""
    runs = runs.assign(mib=runs["bytes_read_per_step"] / MIB)
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    sns.scatterplot(data=runs, x="mib", y="score", hue="method", style="method",
                    palette=method_palette(runs["method"]), s=60, ax=axes)
    front = pareto_front(runs, "mib", "score")
    if len(front) >= 2:
        axes.step(front["mib"], front["score"], where="post", color="grey", linestyle=":", linewidth=1.2,
                  label="Pareto front")
    for _, run in runs.iterrows():
        axes.annotate(budget_label(run["budget"]), (run["mib"], run["score"]),
                      textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    _set_score_axis(axes, score_range(runs["score"]))
    axes.set(xlabel="K/V MiB read per decode step", ylabel="score", title=f"{task} — {model}")
    axes.legend(fontsize="small")
    return figure


def plot_pareto(leaderboard: pd.DataFrame, out_dir: Path) -> list[Path]:
    written = []
    measured = leaderboard.dropna(subset=["bytes_read_per_step", "score"])
    measured = measured[measured["bytes_read_per_step"] > 0]
    for (task, model), runs in measured.groupby(["task", "model"], sort=True):
        written += save_figure(pareto_figure(task, model, runs), out_dir, file_stem("pareto", task, model))
    return written


def write_plots(leaderboard: pd.DataFrame, samples: pd.DataFrame, out_dir: Path) -> tuple[list[Path], list[str]]:
    """All plot types from one run per cell; returns the files written and a warning per plot type that failed."""
    chosen = one_run_per_cell(leaderboard) if not leaderboard.empty else leaderboard
    chosen_samples = samples.merge(chosen[RUN_KEYS], on=RUN_KEYS) if not chosen.empty else samples.iloc[0:0]
    written, warnings = [], []
    for plot, data in [(plot_score_vs_budget, chosen), (plot_needle_heatmaps, chosen_samples),
                       (plot_length_by_budget, chosen_samples), (plot_pareto, chosen)]:
        try:
            written += plot(data, Path(out_dir))
        except Exception as err:  # a broken figure must not stop the runner's end-of-run update
            warnings.append(f"{plot.__name__} failed: {err!r}")
            log.warning("%s failed", plot.__name__, exc_info=True)
    return written, warnings
