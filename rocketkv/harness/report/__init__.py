"""Collect results under ``results/runs/`` into tidy frames, a leaderboard with paired-bootstrap deltas vs full
KV, per-task tables and plots (``python -m rocketkv.harness.report`` / ``rocketkv-report``)."""
from rocketkv.harness.report.bootstrap import paired_bootstrap_ci, paired_differences
from rocketkv.harness.report.collect import Results, collect_results, load_results
from rocketkv.harness.report.leaderboard import LEADERBOARD_COLUMNS, build_leaderboard
from rocketkv.harness.report.status import grid_status, read_grid_spec
from rocketkv.harness.report.update import Report, update_leaderboard, write_leaderboard

__all__ = [
    "LEADERBOARD_COLUMNS", "Report", "Results", "build_leaderboard", "collect_results", "grid_status",
    "load_results", "paired_bootstrap_ci", "paired_differences", "read_grid_spec", "update_leaderboard",
    "write_leaderboard",
]
