"""The first hour of a new user (issue 31): what a run leaves behind, how it resumes and recovers, what it shows
while it works, and the report's figures.  Error lines are in tests/test_errors.py."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, SUBPROCESS_TIMEOUT
from rocketkv.harness import cli
from rocketkv.harness.runner import run

TINY = ["model=tiny-random", "task=needle", "task.lengths=[300]", "task.depths=[0.0,0.5]", "update_leaderboard=false",
        "progress=false", "method=full"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ---------------------------------------------------------------- predictions.jsonl
def test_a_malformed_line_in_the_middle_keeps_every_valid_row(tmp_path, caplog):
    from rocketkv.harness.results import PredictionLog

    path = tmp_path / "predictions.jsonl"
    text = '{"id": "a", "score": 1}\n{"id": "b", "sco\n{"id": "c", "score": 3}\n{"id": "d", "score": 4}\n'
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        log = PredictionLog(path, repair=True)
    assert log.done() == {"a", "c", "d"}
    assert f"{path}: line 2 is not valid JSON" in caplog.text
    assert path.read_text() == text, "reading must not change the file"


def test_a_torn_last_line_is_cut_only_under_the_lock(tmp_path):
    from rocketkv.harness.results import PredictionLog

    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "predic')
    assert PredictionLog(path).done() == {"a", "b"}
    assert path.read_text().endswith('"predic'), "a reader without the lock must leave the file alone"
    assert PredictionLog(path, repair=True).done() == {"a", "b"}
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_a_resumed_run_keeps_the_rows_after_a_bad_line(compose_cfg, tmp_path):
    args = [*TINY, f"output_dir={tmp_path}"]
    [first] = run(compose_cfg(*args, "limit=1"))
    preds = Path(first["run"]["results_dir"]) / "predictions.jsonl"
    good = lines(preds)
    preds.write_text("{not json\n" + good[0] + "\n")  # a bad line before the finished sample
    [second] = run(compose_cfg(*args))
    assert second["n_samples"] == 2
    rows = lines(preds)
    assert rows[:2] == ["{not json", good[0]] and len(rows) == 3, "the finished sample is kept, not run again"


# ---------------------------------------------------------------- recovery
def test_a_deleted_config_yaml_is_written_again_and_the_report_notices(compose_cfg, tmp_path):
    from rocketkv.harness.report import load_results

    args = [*TINY, f"output_dir={tmp_path}", "limit=1"]
    [metrics] = run(compose_cfg(*args))
    config = Path(metrics["run"]["results_dir"]) / "config.yaml"
    written = config.read_text()
    config.unlink()
    assert any(w == f"{config.parent}: config.yaml missing (the cell's own command, run again, writes it)"
               for w in load_results(tmp_path).warnings)
    [again] = run(compose_cfg(*args))  # complete: no model is loaded, the file comes back
    assert again == metrics and config.read_text() == written


def test_a_cell_dropped_before_decoding_leaves_no_folder(compose_cfg, tmp_path):
    """Locks are taken before the model loads; a folder created for them and never used is removed again."""
    grid = [*TINY, f"output_dir={tmp_path}", "limit=1", "grid.methods=[full,snapkv]", "grid.budgets=[64]"]
    with pytest.raises(ValueError, match="snapkv@64"):
        run(compose_cfg(*grid))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*"))


# ---------------------------------------------------------------- where a run writes
def run_cli_in(cwd: Path, monkeypatch, *overrides: str) -> int:
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")
    monkeypatch.setattr(sys, "argv", ["run_eval.py", *overrides])
    try:
        cli.main()
    except SystemExit as done:
        return done.code
    return 0


def test_a_run_writes_nothing_outside_output_dir(monkeypatch, tmp_path, capsys):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    assert run_cli_in(cwd, monkeypatch, *TINY, f"output_dir={out}", "task.lengths=[9000]") == 2  # fails validation
    assert run_cli_in(cwd, monkeypatch, *TINY, f"output_dir={out}", "limit=1") == 0
    assert "score" in capsys.readouterr().out
    assert list(cwd.iterdir()) == [], "Hydra's run folder (or its log) was written to the working directory"
    assert (out / "runs").is_dir() and not (out / "hydra").exists()
    (env,) = out.glob("runs/*/*/*/*/*/env.json")
    assert json.loads(env.read_text())["cpu_threads"] >= 1  # what threads=auto chose, kept with the results


def test_a_multirun_keeps_its_sweep_folder_under_output_dir(tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "run_eval.py"), "-m", *TINY, "limit=1", "method=full,snapkv",
                           "budget=128", f"output_dir={out}"], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    (sweep,) = (out / "hydra" / "multirun").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert len(list(out.glob("runs/needle/tiny-random/*/*/*/predictions.jsonl"))) == 2


def test_the_cli_checks_run_options_before_importing_torch():
    code = ("import sys\nsys.argv = ['run_eval.py', 'limit=-1', 'hydra.run.dir=.']\nfrom rocketkv.harness import cli\n"
            "try:\n    cli.main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules, "
            "'transformers' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=SUBPROCESS_TIMEOUT)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert proc.stderr.strip() == "error: limit=-1 is not valid; give a positive integer, or null for no limit"


def test_rocketkv_still_exports_its_api_lazily():
    import rocketkv
    from rocketkv.core import compress

    assert rocketkv.compress is compress and "make_method" in dir(rocketkv)
    with pytest.raises(AttributeError):
        rocketkv.nope  # noqa: B018


# ---------------------------------------------------------------- RULER
def test_ruler_generates_only_what_limit_takes_and_caches_under_output_dir(compose_cfg, tmp_path):
    from evals.ruler.task import RulerTask
    from rocketkv.harness.cells import config_hash
    from rocketkv.harness.models import tiny_tokenizer

    cfg = compose_cfg("model=tiny-random", "task=ruler", f"output_dir={tmp_path}", "task.tasks=[niah_single_1,vt]",
                      "task.num_samples=3", "task.max_seq_length=[1024]")
    assert cfg.task.cache_dir == f"{tmp_path}/cache/ruler"
    other = compose_cfg("model=tiny-random", "task=ruler", "output_dir=elsewhere", "task.tasks=[niah_single_1,vt]",
                        "task.num_samples=3", "task.max_seq_length=[1024]")
    assert config_hash(cfg, True) == config_hash(other, True), "where the cache is does not change results"

    tok = tiny_tokenizer()
    limited = RulerTask(cfg.task)
    limited.limit = 2
    first = limited.samples(tok, 8192)
    assert [s.id for s in first] == ["niah_single_1/1024/0", "niah_single_1/1024/1", "vt/1024/0", "vt/1024/1"]
    files = sorted(p.name for p in (tmp_path / "cache" / "ruler").glob("*.jsonl"))
    assert len(files) == 2
    full = RulerTask(cfg.task).samples(tok, 8192)  # the whole set: the limited one is its start
    assert len(full) == 6
    assert [s.to_dict() for s in first] == [s.to_dict() for s in full if int(s.id.split("/")[-1]) < 2]
    again = RulerTask(cfg.task)
    again.limit = 1
    cached = sorted(p.name for p in (tmp_path / "cache" / "ruler").glob("*.jsonl"))
    assert [s.to_dict() for s in again.samples(tok, 8192)] == [full[0].to_dict(), full[3].to_dict()]
    assert sorted(p.name for p in (tmp_path / "cache" / "ruler").glob("*.jsonl")) == cached, \
        "a shorter set is read from the full one, not generated"


# ---------------------------------------------------------------- LongBench quick runs
def test_longbench_max_new_tokens_caps_each_subset(tmp_path):
    from evals.longbench.prompts import MAX_NEW_TOKENS
    from evals.longbench.task import LongBenchTask

    fixtures = Path(__file__).parent / "fixtures" / "longbench"
    base = {"name": "longbench", "data_dir": str(fixtures), "cache_dir": str(tmp_path)}
    capped = LongBenchTask({**base, "max_new_tokens": 48})
    official = LongBenchTask(base)
    for sample in capped.samples(None, 4096):
        assert sample.max_new_tokens == min(48, MAX_NEW_TOKENS[sample.subtask])
    assert capped.protocol() != official.protocol(), "a capped run is not compared with the official one"


# ---------------------------------------------------------------- memory and threads
def test_a_model_too_big_for_memory_is_refused_and_bfloat16_allowed_when_it_fits():
    import dataclasses

    import yaml

    from rocketkv.harness.models import ModelSpec, available_memory, check_memory

    import torch

    have = available_memory(torch.device("cpu"))
    if have is None:
        pytest.skip("no MemAvailable on this platform")
    spec = ModelSpec.from_cfg(yaml.safe_load((REPO / "conf" / "model" / "llama3.1-8b-random.yaml").read_text()))
    spec = dataclasses.replace(spec, device="cpu", parameters=int(have * 0.35))  # fp32 1.4x, bf16 0.7x the memory
    with pytest.raises(ValueError, match=r"float32 alone, and cpu has .* GiB available.* model\.dtype=bfloat16 "
                                         r"needs"):
        check_memory(spec)
    check_memory(dataclasses.replace(spec, dtype="bfloat16"))


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    from rocketkv.harness.options import auto_threads, threads_option

    assert auto_threads(2, 0.1) == 2 and auto_threads(2, 0.8) == 1 and auto_threads(2, 6.0) == 1
    assert auto_threads(16, 3.6) == 12
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_option("auto") is None  # torch's default, which follows OMP_NUM_THREADS
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= threads_option("auto") <= os.cpu_count()
    assert threads_option(3) == 3 and threads_option(None) is None


# ---------------------------------------------------------------- progress inside a sample
def test_a_long_sample_shows_its_prefill_and_decoded_tokens():
    from tqdm import tqdm

    from rocketkv.core import compress
    from rocketkv.harness import progress
    from rocketkv.harness.generation import decode, prefill
    from rocketkv.harness.models import build_tiny_random

    model, tok = build_tiny_random()
    bar = tqdm(total=1, file=io.StringIO())
    shown = []
    bar.set_postfix_str = lambda text, refresh=True: shown.append(text)  # what the bar would print
    rows = [list(range(3, 203))]
    try:
        progress.track(bar, min_interval=0.0)
        with compress(model, "full", max_new_tokens=6) as session:
            cache = session.new_cache(6)
            logits, _ = prefill(model, rows, cache, split_last=False)
            decode(model, tok, logits, cache, 6, ignore_eos=True)
        progress.track(None)
    finally:
        progress.track(None)
    assert shown[0].startswith("prefill 200 tok in ") and shown[-2].endswith("decoded 6/6")
    assert [s.split(", ")[1] for s in shown[1:-1]] == [f"decoded {i}/6" for i in range(2, 7)]
    assert shown[-1] == "", "the next sample starts without the last one's progress"


def test_a_short_sample_shows_nothing():
    from tqdm import tqdm

    from rocketkv.harness import progress

    bar = tqdm(total=1, file=io.StringIO())
    shown = []
    bar.set_postfix_str = lambda text, refresh=True: shown.append(text)
    progress.track(bar)  # the default interval: seconds before the first report
    progress.prefilled(100)
    progress.decoded(1, 2)
    progress.track(None)
    assert shown == []


# ---------------------------------------------------------------- plots
def leaderboard(scores: dict, ci: tuple[float, float], read: dict | None = None) -> pd.DataFrame:
    rows = []
    for (method, budget), score in scores.items():
        rows.append({"task": "needle", "model": "tiny", "method": method, "budget": budget, "score": score,
                     "delta_vs_full": 0.0,  # the bands are centred on each score
                     "delta_ci_low": ci[0], "delta_ci_high": ci[1],
                     "bytes_read_per_step": (read or {}).get((method, budget), float(budget or 4096) * 2**14)})
    frame = pd.DataFrame(rows)
    frame["budget"] = frame["budget"].astype("Int64")
    return frame


def test_the_score_axis_and_ci_bands_stay_in_the_metric_range():
    import matplotlib.pyplot as plt

    from rocketkv.harness.report.plots import score_vs_budget_figure

    runs = leaderboard({("full", None): 100.0, ("snapkv", 64): 2.0, ("snapkv", 128): 98.0}, ci=(-40.0, 40.0))
    figure = score_vs_budget_figure("needle", "tiny", runs)
    axes = figure.axes[0]
    low, high = axes.get_ylim()
    assert -5 < low <= 0 and 100 <= high < 105
    (band,) = axes.collections[-1:]
    ys = [y for path in band.get_paths() for _, y in path.vertices]
    assert min(ys) == 0.0 and max(ys) == 100.0
    plt.close(figure)


def test_speed_scores_are_only_kept_non_negative():
    from rocketkv.harness.report.plots import score_range

    assert score_range(pd.Series([12.0, 140.0])) == (0.0, None)
    assert score_range(pd.Series([0.0, 100.0, None])) == (0.0, 100.0)


def test_the_pareto_plot_reads_mib_and_draws_the_front_it_lists():
    import matplotlib.pyplot as plt

    from rocketkv.harness.report.plots import pareto_figure

    runs = leaderboard({("full", None): 90.0, ("snapkv", 64): 50.0, ("snapkv", 128): 80.0, ("quest", 64): 40.0},
                       ci=(0, 0), read={("full", None): 64 * 2**20, ("snapkv", 64): 2**20, ("snapkv", 128): 2 * 2**20,
                                        ("quest", 64): 2 * 2**20})
    figure = pareto_figure("needle", "tiny", runs)
    axes = figure.axes[0]
    assert "MiB" in axes.get_xlabel()
    (front,) = [line for line in axes.get_lines() if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [1.0, 2.0, 64.0] and list(front.get_ydata()) == [50.0, 80.0, 90.0]
    assert "Pareto front" in [t.get_text() for t in axes.get_legend().get_texts()]
    plt.close(figure)

    lone = pareto_figure("needle", "tiny", runs[runs["method"] == "full"])
    labels = [t.get_text() for t in lone.axes[0].get_legend().get_texts()]
    assert "Pareto front" not in labels, "a front of one point is not drawn, so it is not listed"
    plt.close(lone)
