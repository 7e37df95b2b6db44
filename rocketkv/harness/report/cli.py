"""``rocketkv-report``: rebuild the leaderboard, tables and plots, or show how far a grid has got."""
from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from rocketkv.harness.report.collect import load_results
from rocketkv.harness.report.status import format_status, grid_status, read_grid_spec
from rocketkv.harness.report.tables import budget_label
from rocketkv.harness.report.update import update_leaderboard

SHOWN_COLUMNS = ["task", "model", "method", "budget", "score", "n_samples", "complete", "delta_vs_full",
                 "delta_ci_low", "delta_ci_high", "bytes_read_per_step"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rocketkv-report", description=__doc__)
    parser.add_argument("--root", default="results", help="results root holding runs/ (default: results)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument("--status", metavar="SPEC_YAML",
                        help="only report which cells of this grid spec are done / incomplete / missing")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one line ``error: ...`` when a file cannot be read or the report cannot be written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return report(args)
    except (OSError, ValueError) as err:
        print(f"error: {describe(err, args)}", file=sys.stderr)
        return 2


def describe(err: Exception, args: argparse.Namespace) -> str:
    if isinstance(err, FileNotFoundError) and args.status and err.filename == args.status:
        return f"--status {args.status}: no such file; give a grid spec YAML (tasks, models, methods, budgets)"
    if isinstance(err, OSError) and err.filename:
        return (f"{(err.strerror or type(err).__name__).lower()}: {err.filename}; the report reads runs/ and writes "
                f"its files under --root {args.root}, which must be a folder you can write")
    return str(err)


def report(args: argparse.Namespace) -> int:
    if args.status:
        runs = load_results(args.root).runs
        print(format_status(grid_status(runs, read_grid_spec(args.status))), end="")
        return 0
    report = update_leaderboard(args.root, plots=not args.no_plots, n_resamples=args.resamples, seed=args.seed)
    if report.leaderboard.empty:
        print(f"no runs found under {args.root}/runs")
        return 0
    with pd.option_context("display.width", 200, "display.max_rows", None, "display.float_format", "{:.2f}".format):
        shown = report.leaderboard[SHOWN_COLUMNS]
        print(shown.assign(budget=shown["budget"].map(budget_label)).to_string(index=False))
    print(f"\n{len(report.leaderboard)} runs, {len(report.files)} files written under {args.root}, "
          f"{len(report.warnings)} warnings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
