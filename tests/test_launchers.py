"""Multirun grids through the submitit launchers, requeue-safe jobs and sharding (offline, tiny-random model).

The SLURM path runs without a cluster: ``tests/fixtures/fake_slurm/`` puts fake ``sbatch``/``srun``/``sacct``/
``squeue``/``scancel``/``scontrol`` on PATH; they record each submission under ``$FAKE_SLURM_DIR`` and run the jobs
on this machine with the SLURM_* variables submitit reads.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import REPO, SUBPROCESS_TIMEOUT

CONF = REPO / "conf"
FAKE_SLURM = REPO / "tests" / "fixtures" / "fake_slurm"
FAKE_COMMANDS = ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol")

QUIET = ["update_leaderboard=false", "progress=false"]
# One tiny sample per cell, for the launcher plumbing.
TINY = ["model=tiny-random", "task=needle", "task.lengths=[200]", "task.depths=[0.5]", "limit=1", *QUIET]
# Eight samples of one cell, long enough to interrupt after the first but before the last.
DEPTHS = [0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]
CELL = ["model=tiny-random", "task=needle", "task.lengths=[600]", f"task.depths={DEPTHS}", "method=snapkv",
        "budget=128", *QUIET]
N_CELL = len(DEPTHS)
# Fields that must match between runs (timings and memory are not deterministic).
SAME = ("id", "subtask", "meta", "prompt_tokens", "prediction", "references", "score", "new_tokens", "stats",
        "budget_params")


def eval_cmd(*overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "run_eval.py", *(["-m"] if multirun else []), *overrides]


def base_env() -> dict:
    return dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")


def slurm_env(tmp_path: Path) -> dict:
    """PATH with the fake SLURM commands (copied, so their exec bits do not depend on the checkout)."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    for name in (*FAKE_COMMANDS, "fake_slurm.py"):
        target = bin_dir / name
        shutil.copy(FAKE_SLURM / name, target)
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = base_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_SLURM_DIR=str(tmp_path / "slurm"),
               FAKE_SLURM_PYTHON=sys.executable)
    return env


def run_checked(cmd: list[str], env: dict, timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout or SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def cells(out: Path) -> dict[tuple[str, str], Path]:
    """(method, budget folder) -> run folder, for the tiny-random needle runs under ``out``."""
    found = {}
    for folder in sorted((out / "runs" / "needle" / "tiny-random").glob("*/*/*")):
        key = (folder.parent.parent.name, folder.parent.name)
        assert key not in found, f"two config hashes for {key}: {found[key]} and {folder}"
        found[key] = folder
    return found


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in SAME} for r in records]


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_predictions(out: Path, proc: subprocess.Popen, timeout: float | None = None) -> Path:
    """The predictions file of the single cell under ``out`` once it holds at least one finished sample."""
    timeout = timeout or SUBPROCESS_TIMEOUT
    deadline = time.time() + timeout
    while time.time() < deadline:
        files = list(out.glob("runs/*/*/*/*/*/predictions.jsonl"))
        if files and line_count(files[0]) >= 1:
            return files[0]
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before writing a prediction"
        time.sleep(0.05)
    raise AssertionError(f"no prediction under {out} after {timeout}s")


def run_in_process(overrides: list[str]) -> dict:
    from rocketkv.harness.runner import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    metrics = run(cfg)
    if isinstance(metrics, list):  # the runner returns one metrics dict per cell of a grid
        (metrics,) = metrics
    return metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One clean, uninterrupted, unsharded run of CELL: (its folder relative to output_dir, its records)."""
    out = tmp_path_factory.mktemp("reference")
    metrics = run_in_process([*CELL, f"output_dir={out}"])
    folder = Path(metrics["run"]["results_dir"])
    records = read_records(folder / "predictions.jsonl")
    assert [r["id"] for r in records] and len(records) == N_CELL and metrics["run"]["complete"]
    return folder.relative_to(out), records


def test_local_launcher_multirun(tmp_path):
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    run_checked(eval_cmd("hydra/launcher=local", *TINY, "method=full,snapkv", "budget=128", f"output_dir={out}",
                         f"hydra.sweep.dir={sweep}", multirun=True), base_env())
    found = cells(out)
    assert set(found) == {("full", "none"), ("snapkv", "128")}
    for folder in found.values():
        assert line_count(folder / "predictions.jsonl") == 1
        assert json.loads((folder / "metrics.json").read_text())["run"]["complete"]
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "the cells did not run through submitit_local"


def test_slurm_launcher_multirun_with_fake_slurm(tmp_path):
    env = slurm_env(tmp_path)
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    run_checked(eval_cmd("hydra/launcher=slurm", "hydra.launcher.partition=testpart",
                         "hydra.launcher.account=testacct", "hydra.launcher.timeout_min=7",
                         "hydra.launcher.gpus_per_node=1", "hydra.launcher.array_parallelism=2", *TINY,
                         "method=full,snapkv", "budget=128", f"output_dir={out}", f"hydra.sweep.dir={sweep}",
                         multirun=True), env)
    found = cells(out)
    assert set(found) == {("full", "none"), ("snapkv", "128")}
    for folder in found.values():
        assert line_count(folder / "predictions.jsonl") == 1
        assert json.loads((folder / "metrics.json").read_text())["run"]["complete"]

    slurm_dir = tmp_path / "slurm"
    scripts = list((slurm_dir / "scripts").glob("*.sh"))
    assert len(scripts) == 1, "a sweep is one sbatch array"
    script = scripts[0].read_text()
    for line in ("#SBATCH --partition=testpart", "#SBATCH --account=testacct", "#SBATCH --time=7",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --array=0-1%2", "#SBATCH --signal=USR2@120",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "export TOKENIZERS_PARALLELISM=false"):
        assert line in script.splitlines(), f"{line!r} not in the sbatch script:\n{script}"
    assert "submitit.core._submit" in script
    calls = (slurm_dir / "calls.log").read_text()
    assert calls.count("srun ") == 2


def test_killed_job_resumes_to_the_clean_result(tmp_path, reference):
    """SIGKILL mid-cell (plus a torn last line), then the same command again: what a requeued job does."""
    rel, clean = reference
    out = tmp_path / "out"
    cmd = eval_cmd(*CELL, f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            preds = wait_for_predictions(out, proc)
        finally:
            proc.kill()
            proc.wait()
    assert preds.parent.relative_to(out) == rel, "a rerun must land in the same run folder"
    n_killed = line_count(preds)
    assert 1 <= n_killed < N_CELL, f"kill came too late to test resuming ({n_killed} of {N_CELL} done)"
    with open(preds, "ab") as f:  # a write cut off by the kill
        f.write(b'{"id": "needle-trunc')

    proc = run_checked(cmd, base_env())
    records = read_records(preds)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == N_CELL
    assert comparable(records) == comparable(clean)
    assert json.loads((preds.parent / "metrics.json").read_text())["n_samples"] == N_CELL


def test_slurm_preemption_requeues_and_resumes(tmp_path, reference):
    """USR2 through (fake) scancel: submitit checkpoints the launcher call, requeues it, the rerun resumes."""
    rel, clean = reference
    env = slurm_env(tmp_path)
    out, sweep, slurm_dir = tmp_path / "out", tmp_path / "sweep", tmp_path / "slurm"
    cmd = eval_cmd("hydra/launcher=slurm", "hydra.launcher.partition=testpart", *CELL, f"output_dir={out}",
                   f"hydra.sweep.dir={sweep}", multirun=True)
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            preds = wait_for_predictions(out, proc)
            (job_script,) = (slurm_dir / "scripts").glob("*.sh")
            job_id = job_script.stem
            subprocess.run(["scancel", job_id, "--signal", "USR2"], env=env, check=True,
                           timeout=SUBPROCESS_TIMEOUT)
            n_signalled = line_count(preds)
            rc = proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    assert n_signalled < N_CELL, "the signal came too late to test the requeue"
    assert f"scontrol requeue {job_id}" in (slurm_dir / "calls.log").read_text()
    assert (slurm_dir / "jobs" / f"{job_id}.runs").read_text() == "2", "the job was not run a second time"
    state = slurm_dir / "jobs" / f"{job_id}.state"
    # the sweep returns on the result pickle, the job process exits just after
    deadline = time.time() + SUBPROCESS_TIMEOUT
    while state.read_text() == "RUNNING" and time.time() < deadline:
        time.sleep(0.2)
    assert state.read_text() == "COMPLETED"
    assert preds.parent.relative_to(out) == rel
    records = read_records(preds)
    assert len({r["id"] for r in records}) == len(records) == N_CELL
    assert comparable(records) == comparable(clean)


def test_shards_cover_the_unsharded_run(tmp_path, reference):
    rel, clean = reference
    out = tmp_path / "out"
    shards = [run_in_process([*CELL, f"output_dir={out}", f"shard={i}/2"]) for i in range(2)]
    folders = {Path(m["run"]["results_dir"]) for m in shards}
    assert folders == {out / rel}, "shards share the unsharded run's folder"
    parts = [read_records(out / rel / f"predictions.shard-{i}-of-2.jsonl") for i in range(2)]
    ids = [{r["id"] for r in part} for part in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    merged = {r["id"]: r for part in parts for r in part}
    assert comparable([merged[r["id"]] for r in clean]) == comparable(clean)
    assert sum(m["n_samples"] for m in shards) == N_CELL and all(m["run"]["complete"] for m in shards)


def _sweep_jobs(experiment: str, *extra: str, sweeper: str = "basic") -> list[list[str]]:
    """The jobs a sweeper (Hydra's basic one, or ``grid``) makes of an experiment's ``hydra.sweeper.params``
    (+ command-line values)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.rocketkv_grid_sweeper.grid_sweeper import GridSweeper

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", f"hydra/sweeper={sweeper}"],
                      return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + list(extra)
    split = {"basic": BasicSweeper, "grid": GridSweeper}[sweeper].split_arguments
    (batch,) = split(OverridesParser.create().parse_overrides(params), None)
    return batch


def _cells(experiment: str, jobs: list[list[str]]) -> list[tuple[str, str, str, int | None]]:
    """(model, task, method, budget) of every results folder the jobs write, via the runner's grid expansion."""
    from rocketkv.core.methods import METHODS
    from rocketkv.harness.runner import grid_configs

    out = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", *job])
            for cell in grid_configs(cfg):
                budget = cell.budget if METHODS[cell.method.name].uses_budget else None
                out.append((cell.model.name, cell.task.name, cell.method.name, budget))
    return out


def test_paper_grid_expands_to_the_paper_cells():
    jobs = _sweep_jobs("paper_grid")
    assert len(jobs) == 3 * 3 * 6
    cells = _cells("paper_grid", jobs)
    assert len(cells) == len(set(cells)), "two jobs would write the same results folder"
    models = ["llama3.1-8b-instruct", "mistral-7b-instruct-v0.2", "longchat-7b-v1.5-32k"]
    tasks = ["longbench", "ruler", "needle"]
    budgets = [256, 512, 1024, 2048, 4096]
    expected = set(itertools.product(models, tasks, ["full"], [None]))
    expected |= set(itertools.product(models, tasks, ["snapkv", "quest", "sparq", "topk", "rocketkv"], budgets))
    assert set(cells) == expected and len(cells) == 3 * 3 * (1 + 5 * 5)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert not compose(config_name="config", overrides=["+experiment=paper_grid"]).update_leaderboard
    grid_jobs = _sweep_jobs("paper_grid", sweeper="grid")  # one job per model x task, all methods in its grid
    assert len(grid_jobs) == 3 * 3
    assert sorted(_cells("paper_grid", grid_jobs)) == sorted(cells)


def test_cpu_needle_grid_cells_are_valid():
    from rocketkv.core.methods import make_method

    jobs = _sweep_jobs("cpu_needle_grid")
    assert len(jobs) == 6
    cells = _cells("cpu_needle_grid", jobs)
    assert len(cells) == len(set(cells)) == 1 + 5 * 4
    assert {c[:2] for c in cells} == {("smollm2-135m", "needle")}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=cpu_needle_grid"])
        assert list(cfg.task.lengths) == [2000, 4000] and cfg.grid.skip_invalid and cfg.threads == 1
    rejected = []
    for _, _, name, budget in cells:
        opts = {k: v for k, v in yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text()).items() if k != "name"}
        # SmolLM2-135M: head dim 64, 9 query / 3 KV heads; 2000 tokens is the grid's shortest prompt.
        try:
            make_method(name, budget=budget, **opts).plan(2000, 16, 64, 8192, group_size=3)
        except ValueError:
            rejected.append((name, budget))
    assert rejected == [("snapkv", 32), ("snapkv", 64)]  # skipped by grid.skip_invalid, the rest must run


def test_grid_sweeper_runs_a_method_budget_sweep_as_one_grid_job(tmp_path):
    """hydra/sweeper=grid: the method x budget sweep becomes one job per value of every other swept key (seed
    here), each a shared-prefill grid writing the same cells as the basic sweeper's one job per cell."""
    sweep = ["method=full,rocketkv", "budget=64,128", "seed=0,1"]  # 8 basic jobs: the suite's longest test
    grid_out, basic_out = tmp_path / "grid", tmp_path / "basic"
    proc = run_checked(eval_cmd("hydra/sweeper=grid", *TINY, *sweep, f"output_dir={grid_out}",
                                f"hydra.sweep.dir={tmp_path / 'grid_sweep'}", multirun=True), base_env())
    assert "Launching 2 jobs" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "grid_sweep").iterdir() if p.is_dir()) == ["0", "1"]
    run_checked(eval_cmd(*TINY, *sweep, f"output_dir={basic_out}", f"hydra.sweep.dir={tmp_path / 'basic_sweep'}",
                         multirun=True), base_env())
    grid_runs = sorted(p.relative_to(grid_out) for p in grid_out.glob("runs/*/*/*/*/*"))
    assert len(grid_runs) == 2 * 3  # per seed: full + rocketkv at two budgets
    assert grid_runs == sorted(p.relative_to(basic_out) for p in basic_out.glob("runs/*/*/*/*/*"))
    for run in grid_runs:
        assert comparable(read_records(grid_out / run / "predictions.jsonl")) == \
            comparable(read_records(basic_out / run / "predictions.jsonl"))


def test_grid_sweeper_turns_only_method_and_budget_sweeps_into_lists():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.rocketkv_grid_sweeper.grid_sweeper import GridSweeper, coalesce

    parsed = OverridesParser.create().parse_overrides(["method=full,snapkv", "budget=128", "seed=0,1", "limit=2"])
    assert coalesce(parsed) == ["grid.methods=[full,snapkv]", "budget=128", "seed=0,1", "limit=2"]
    [jobs] = GridSweeper.split_arguments(parsed, None)
    assert jobs == [["grid.methods=[full,snapkv]", "budget=128", "seed=0", "limit=2"],
                    ["grid.methods=[full,snapkv]", "budget=128", "seed=1", "limit=2"]]
