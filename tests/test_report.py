"""Report package on a synthetic results tree (offline, no model)."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rocketkv.harness.report import (
    LEADERBOARD_COLUMNS, collect_results, grid_status, load_results, paired_bootstrap_ci, read_grid_spec,
    update_leaderboard, write_leaderboard,
)
from rocketkv.harness.report.atomic import atomic_write
from rocketkv.harness.report.cli import main
from rocketkv.harness.report.frames import TIDY_COLUMNS
from rocketkv.harness.report.tables import plain_markdown, score_pivots

NEEDLE_LENGTHS = [1000, 2000]
NEEDLE_DEPTHS = [0.0, 0.5, 1.0]
RULER_LENGTHS = [4096, 8192]
RULER_SUBTASKS = ["niah_single", "vt"]


def record(sample_id, subtask, meta, score, budget):
    kept = float(budget if budget is not None else meta.get("length", 4096))
    return {
        "id": sample_id, "subtask": subtask, "meta": meta, "prompt_tokens": 100, "prediction": "x",
        "references": ["x"], "score": float(score), "new_tokens": 10, "time_prefill_s": 0.5,
        "time_decode_s": 0.25, "peak_mem_bytes": 1000,
        "stats": {"kept_tokens": kept, "attended_tokens": kept, "bytes_read_per_step": kept * 8,
                  "elements_read_per_step": kept * 2, "stored_kv_bytes": kept * 16},
    }


def needle_records(score_of, budget):
    return [record(f"n-{length}-{depth}", "needle", {"length": length, "depth": depth},
                   score_of(length, depth), budget)
            for length in NEEDLE_LENGTHS for depth in NEEDLE_DEPTHS]


def ruler_records(score_of, budget):
    return [record(f"r-{sub}-{length}-{i}", sub, {"length": length}, score_of(sub, length, i), budget)
            for sub in RULER_SUBTASKS for length in RULER_LENGTHS for i in range(2)]


def run_folder(root, task, model, method, budget, config_hash="h0"):
    folder = root / "runs" / task / model / method / ("none" if budget is None else str(budget)) / config_hash
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "budget": budget}))
    return folder


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_metrics(folder, records, task, model, method, budget, complete=True):
    subtasks = pd.DataFrame(records).groupby("subtask")["score"].agg(["mean", "size"])
    metrics = {
        "score": float(subtasks["mean"].mean()), "n_samples": len(records),
        "subtasks": {name: {"score": float(row["mean"]), "n": int(row["size"])} for name, row in subtasks.iterrows()},
        "stats": {}, "timing": {"prefill_s_mean": 0.5, "decode_s_mean": 0.25, "decode_tokens_per_s": 40.0,
                                "peak_mem_bytes_max": 1000},
        "run": {"task": task, "model": model, "method": method, "budget": budget, "config_hash": "h0",
                "protocol_hash": f"p-{task}", "code_version": "abc123", "complete": complete,
                "n_expected": len(records)},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def add_run(root, task, model, method, budget, records, metrics=True):
    folder = run_folder(root, task, model, method, budget)
    write_lines(folder / "predictions.jsonl", records)
    if metrics:
        write_metrics(folder, records, task, model, method, budget)
    return folder


def rocket_needle(length, depth):
    return 100.0 if depth < 1.0 else 0.0


def full_ruler(sub, length, i):
    return 100.0 - 10 * i


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    # needle: full = 100; quest identical to full; snapkv exactly 10 points lower; rocketkv fails at depth 1.
    add_run(root, "needle", "tiny", "full", None, needle_records(lambda l, d: 100.0, None))
    for budget in (64, 128):
        add_run(root, "needle", "tiny", "quest", budget, needle_records(lambda l, d: 100.0, budget))
        add_run(root, "needle", "tiny", "snapkv", budget, needle_records(lambda l, d: 90.0, budget))
        add_run(root, "needle", "tiny", "rocketkv", budget, needle_records(rocket_needle, budget))
    # a model with no full run: deltas are NaN
    add_run(root, "needle", "nofull", "snapkv", 64, needle_records(lambda l, d: 50.0, 64))

    add_run(root, "ruler", "tiny", "full", None, ruler_records(full_ruler, None))
    for budget in (64, 128):
        add_run(root, "ruler", "tiny", "snapkv", budget, ruler_records(lambda s, l, i: 50.0, budget))
    # no metrics.json: the score is recomputed from the predictions
    add_run(root, "ruler", "tiny", "sparq", 64, ruler_records(lambda s, l, i: 80.0 if s == "vt" else 40.0, 64),
            metrics=False)
    # truncated last line plus a malformed middle line: 6 of 8 lines survive
    topk = run_folder(root, "ruler", "tiny", "topk", 64)
    lines = [json.dumps(r) for r in ruler_records(lambda s, l, i: 70.0, 64)]
    lines[3] = "{not json"
    (topk / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    (topk / "config.yaml").write_text("method: [unclosed\n")
    # sharded, shard 1 of 3 missing, no metrics
    sharded = run_folder(root, "ruler", "tiny", "rocketkv", 128)
    shard_records = ruler_records(lambda s, l, i: 60.0, 128)
    write_lines(sharded / "predictions.shard-0-of-3.jsonl", shard_records[0:3])
    write_lines(sharded / "predictions.shard-2-of-3.jsonl", shard_records[6:8])
    # junk that must be skipped with a warning
    (root / "runs" / "ruler" / "tiny" / "h2o" / "big" / "h0").mkdir(parents=True)
    run_folder(root, "ruler", "tiny", "empty", 64)
    return root


@pytest.fixture(scope="module")
def report(tree):
    return update_leaderboard(tree, plots=True)


def cell(frame, **keys):
    mask = pd.Series(True, index=frame.index)
    for key, value in keys.items():
        mask &= frame[key].isna() if value is None else frame[key].eq(value).fillna(False).astype(bool)
    return frame[mask]


def test_tidy_frame_rows_columns_values(tree):
    tidy = collect_results(tree)
    assert list(tidy.columns) == TIDY_COLUMNS
    needle = cell(tidy, task="needle", model="tiny", method="rocketkv", budget=64)
    assert len(needle) == len(NEEDLE_LENGTHS) * len(NEEDLE_DEPTHS)
    assert (needle["n"] == 1).all()
    assert needle.set_index("depth")["score"].groupby(level=0).mean().to_dict() == {0.0: 100.0, 0.5: 100.0,
                                                                                    1.0: 0.0}
    assert (needle["kept_tokens"] == 64).all() and (needle["bytes_read_per_step"] == 512).all()
    full = cell(tidy, task="ruler", model="tiny", method="full")
    assert len(full) == len(RULER_SUBTASKS) * len(RULER_LENGTHS)
    assert full["depth"].isna().all() and (full["n"] == 2).all()
    assert (full["score"] == 95.0).all() and (full["kept_tokens"] == full["length"]).all()
    assert set(full["protocol_hash"]) == {"p-ruler"} and set(full["code_version"]) == {"abc123"}
    # 2 tasks' worth of runs, the junk folders contribute no rows
    assert set(tidy["method"]) == {"full", "quest", "snapkv", "rocketkv", "sparq", "topk"}
    assert len(cell(tidy, method="topk")) == 4 and cell(tidy, method="topk")["n"].sum() == 6


def test_corrupt_parts_are_warned_and_skipped(tree):
    results = load_results(tree)
    text = "\n".join(results.warnings)
    assert "truncated last line 8 skipped" in text
    assert "malformed JSON on line 4 skipped" in text
    assert "metrics.json: missing" in text
    assert "missing shards [1] of 3" in text
    assert "budget folder 'big'" in text
    assert "no metrics.json and no readable predictions" in text
    assert "config.yaml: unreadable" in text
    topk = cell(results.samples, method="topk")
    assert len(topk) == 6
    sharded = cell(results.runs, method="rocketkv", task="ruler").iloc[0]
    assert sharded["n_predictions"] == 5 and sharded["missing_shards"] == "1" and not sharded["complete"]


def test_leaderboard_csv_schema_and_values(tree, report):
    csv = pd.read_csv(tree / "leaderboard.csv")
    assert list(csv.columns) == LEADERBOARD_COLUMNS
    assert list(pd.read_parquet(tree / "leaderboard.parquet").columns) == LEADERBOARD_COLUMNS
    assert len(csv) == 14  # 7 needle/tiny + 1 needle/nofull + 6 ruler runs
    assert csv.duplicated(["task", "model", "method", "budget", "config_hash"]).sum() == 0
    lb = report.leaderboard
    assert list(lb["model"][:2]) == ["nofull", "tiny"] and lb["method"][1] == "full"  # full first per task x model
    assert list(cell(lb, model="tiny", task="needle")["budget"].astype("string").fillna("none")) == [
        "none", "64", "128", "64", "128", "64", "128"]

    quest = cell(lb, task="needle", model="tiny", method="quest", budget=64).iloc[0]
    assert (quest["delta_vs_full"], quest["delta_ci_low"], quest["delta_ci_high"]) == (0.0, 0.0, 0.0)
    snap = cell(lb, task="needle", model="tiny", method="snapkv", budget=128).iloc[0]
    assert snap["delta_vs_full"] == pytest.approx(-10)
    assert snap["delta_ci_low"] == pytest.approx(-10) and snap["delta_ci_high"] == pytest.approx(-10)
    assert snap["n_paired"] == 6 and snap["full_score"] == 100.0 and snap["score"] == 90.0
    rocket = cell(lb, task="needle", model="tiny", method="rocketkv", budget=64).iloc[0]
    assert rocket["delta_vs_full"] == pytest.approx(-100 / 3)
    assert -100 <= rocket["delta_ci_low"] < rocket["delta_vs_full"] < rocket["delta_ci_high"] <= 0

    nofull = cell(lb, model="nofull").iloc[0]
    assert math.isnan(nofull["delta_vs_full"]) and math.isnan(nofull["delta_ci_low"]) and nofull["n_paired"] == 0

    sparq = cell(lb, method="sparq").iloc[0]
    assert sparq["score_source"] == "predictions" and sparq["score"] == pytest.approx(60.0)
    assert sparq["n_samples"] == 8 and not sparq["complete"]
    # full ruler scores are 100 / 90 per id pair, sparq 40 (niah) / 80 (vt)
    assert sparq["delta_vs_full"] == pytest.approx(60.0 - 95.0)
    topk = cell(lb, method="topk").iloc[0]
    assert topk["n_samples"] == 6 and topk["n_paired"] == 6
    full = cell(lb, task="ruler", method="full").iloc[0]
    assert pd.isna(full["budget"]) and full["score_source"] == "metrics" and full["complete"]
    assert (full["delta_vs_full"], full["delta_ci_low"], full["delta_ci_high"]) == (0.0, 0.0, 0.0)
    assert cell(lb, method="rocketkv", task="ruler").iloc[0]["missing_shards"] == "1"


def test_bootstrap_matches_hand_computation():
    differences = [1.0, 4.0, -2.0, 7.0, 0.5]
    n_resamples, seed = 40, 3
    draws = np.random.default_rng(seed).integers(0, len(differences), size=(n_resamples, len(differences)))
    means = sorted(sum(differences[i] for i in row) / len(row) for row in draws)

    def percentile(q):  # linear interpolation between closest ranks (numpy's default)
        position = (len(means) - 1) * q
        below = int(position)
        return means[below] + (means[min(below + 1, len(means) - 1)] - means[below]) * (position - below)

    mean, low, high = paired_bootstrap_ci(differences, n_resamples=n_resamples, seed=seed)
    assert mean == pytest.approx(sum(differences) / len(differences))
    assert low == pytest.approx(percentile(0.025)) and high == pytest.approx(percentile(0.975))
    assert paired_bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
    assert all(math.isnan(v) for v in paired_bootstrap_ci([]))


def test_pivot_tables_and_markdown(tree, report):
    pivots = score_pivots(report.leaderboard)
    needle = pivots[("needle", "tiny")]
    assert list(needle.index) == ["full", "quest", "rocketkv", "snapkv"]
    assert list(needle.columns) == ["64", "128", "none"]
    assert needle.loc["snapkv", "64"] == 90.0 and needle.loc["full", "none"] == 100.0
    assert pd.isna(needle.loc["full", "64"])
    for stem in ("needle__tiny", "needle__nofull", "ruler__tiny"):
        assert (tree / "tables" / f"{stem}.csv").stat().st_size > 0
        assert "| method" in (tree / "tables" / f"{stem}.md").read_text()
    markdown = plain_markdown(needle).splitlines()
    assert markdown[0] == "| method | 64 | 128 | none |"
    assert markdown[1] == "|---|---:|---:|---:|"
    assert markdown[2] == "| full |  |  | 100.00 |"


def test_every_plot_is_written(tree, report):
    assert not [w for w in report.warnings if "failed" in w]
    expected = [
        "score_vs_budget__needle__tiny", "score_vs_budget__needle__nofull", "score_vs_budget__ruler__tiny",
        "needle_heatmap__needle__tiny", "needle_heatmap__needle__nofull", "length_by_budget__ruler__tiny",
        "pareto__needle__tiny", "pareto__ruler__tiny",
    ]
    for stem in expected:
        for suffix in ("png", "pdf"):
            path = tree / "plots" / f"{stem}.{suffix}"
            assert path.stat().st_size > 0, path
    assert not (tree / "plots" / "length_by_budget__needle__tiny.png").exists()
    assert not (tree / "plots" / "needle_heatmap__ruler__tiny.png").exists()


def test_plots_skipped_without_data(tmp_path):
    add_run(tmp_path, "plain", "tiny", "full", None,
            [{"id": "a", "subtask": "", "meta": {}, "score": 50.0, "stats": {}}])
    report = update_leaderboard(tmp_path, plots=True)
    assert report.files and not list((tmp_path / "plots").glob("*")) and not report.warnings


def test_writes_leave_no_temp_files(tree, report):
    threads = [threading.Thread(target=write_leaderboard, args=(tree,), kwargs={"n_resamples": 50})
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert list(pd.read_csv(tree / "leaderboard.csv").columns) == LEADERBOARD_COLUMNS
    assert (tree / ".leaderboard.lock").exists()
    assert not [p for p in tree.rglob("*") if p.name.endswith(".tmp")]

    target = tree / "tables" / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda temp: (temp.write_text("half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert target.read_text() == "old" and not list(target.parent.glob("*.tmp"))
    target.unlink()


def test_status_of_grid_cells(tree, tmp_path, capsys):
    spec_path = tmp_path / "grid.yaml"
    spec_path.write_text(yaml.safe_dump({
        "tasks": ["ruler"], "models": ["tiny"], "methods": ["full", "snapkv", "rocketkv", "sparq", "topk", "h2o"],
        "budgets": [64, 128], "expected_samples": 8,
    }))
    status = grid_status(load_results(tree).runs, read_grid_spec(spec_path)).set_index(["method", "budget"])
    assert len(status) == 11
    assert status.loc[("full", "none"), "state"] == "done"
    assert status.loc[("snapkv", "64"), "state"] == "done"
    assert status.loc[("sparq", "64"), "state"] == "done"  # all 8 predictions, even without metrics.json
    assert status.loc[("sparq", "128"), "state"] == "missing"
    assert status.loc[("topk", "64"), ["state", "n"]].tolist() == ["incomplete", 6]
    assert status.loc[("rocketkv", "128"), "state"] == "incomplete"
    assert "missing shards 1 of 3" in status.loc[("rocketkv", "128"), "note"]
    assert status.loc[("h2o", "64"), "state"] == "missing"

    assert main(["--root", str(tree), "--status", str(spec_path)]) == 0
    out = capsys.readouterr().out
    lines = {tuple(line.split()[:4]): line for line in out.splitlines() if line.startswith("ruler")}
    assert "incomplete (6 of 8)" in lines[("ruler", "tiny", "topk", "64")]
    assert "incomplete (5 of 8)" in lines[("ruler", "tiny", "rocketkv", "128")]
    assert "missing shards 1 of 3" in lines[("ruler", "tiny", "rocketkv", "128")]
    assert lines[("ruler", "tiny", "rocketkv", "64")].split()[4] == "missing"
    assert lines[("ruler", "tiny", "full", "none")].split()[4] == "done"
    assert "11 cells: done 4, incomplete 2, missing 5" in out


def test_cli_rebuilds_and_prints(tree, capsys):
    assert main(["--root", str(tree), "--no-plots", "--resamples", "100"]) == 0
    out = capsys.readouterr().out
    assert "snapkv" in out and "delta_vs_full" in out and "14 runs" in out
