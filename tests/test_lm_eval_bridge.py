"""lm-eval bridge: the ``rocketkv`` lm-eval model and ``task=lm_eval``, offline on the tiny random model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from rocketkv.harness.lm_eval_model import RocketKVLM  # noqa: E402
from rocketkv.harness.models import build_tiny_random  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"
GEN_TASK, LL_TASK = "rocketkv_copy", "rocketkv_copy_ll"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_random()


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(FIXTURES), include_defaults=False)


def evaluate(lm, task_manager, task):
    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, bootstrap_iters=0,
                                   log_samples=True)


@pytest.fixture(scope="module")
def runs(tiny, task_manager):
    model, tok = tiny
    out = {}
    for method, budget, extra in [("full", None, {}), ("rocketkv", 64, {}), ("snapkv", "64", {"window": "8"})]:
        lm = RocketKVLM(pretrained=model, tokenizer=tok, method=method, budget=budget, **extra)
        out[method] = (lm, evaluate(lm, task_manager, GEN_TASK))
    return out


@pytest.mark.parametrize("method", ["full", "rocketkv", "snapkv"])
def test_generation_task_reports_lm_eval_metric(runs, method):
    lm, res = runs[method]
    metrics = res["results"][GEN_TASK]
    assert 0.0 <= metrics["exact_match,none"] <= 1.0
    assert len(lm.request_stats) == 4
    assert all(s["task"] == GEN_TASK and s["new_tokens"] <= 6 for s in lm.request_stats)
    # until=["\n"] is honoured: no answer runs past a newline
    assert all("\n" not in s["resps"][0][0] for s in res["samples"][GEN_TASK])


def test_model_args_strings_are_coerced(runs):
    lm, _ = runs["snapkv"]
    assert lm.budget == 64 and lm.method_options == {"window": 8}
    assert lm.get_model_info()["kv_method"] == "snapkv"


def test_compression_keeps_fewer_tokens_on_long_prompts(runs):
    full = runs["full"][0].request_stats
    for method in ("rocketkv", "snapkv"):
        compressed = runs[method][0].request_stats
        long = [i for i, s in enumerate(full) if s["prompt_tokens"] > 300]
        assert long, "the fixture needs long prompts"
        for i in long:
            assert compressed[i]["prompt_tokens"] == full[i]["prompt_tokens"]
            assert compressed[i]["kept_tokens"] < 0.6 * full[i]["kept_tokens"]
            assert compressed[i]["attended_tokens"] < full[i]["attended_tokens"]
        summary = runs[method][0].stats_summary()
        assert summary["requests"] == 4 and summary["kept_tokens"] < runs["full"][0].stats_summary()["kept_tokens"]


def test_loglikelihood_refused_by_default(tiny, task_manager):
    model, tok = tiny
    lm = RocketKVLM(pretrained=model, tokenizer=tok, method="rocketkv", budget=64)
    with pytest.raises(NotImplementedError, match=r"rocketkv_copy_ll.*loglikelihood=dense"):
        evaluate(lm, task_manager, LL_TASK)


def test_loglikelihood_dense_pass_through(tiny, task_manager, caplog):
    model, tok = tiny
    lm = RocketKVLM(pretrained=model, tokenizer=tok, method="rocketkv", budget=64, loglikelihood="dense")
    res = evaluate(lm, task_manager, LL_TASK)
    assert "acc,none" in res["results"][LL_TASK]
    assert any("FULL attention" in r.message for r in caplog.records)
    assert lm.request_stats == []


def test_bad_model_args_fail_before_loading():
    with pytest.raises(ValueError, match="unknown method"):
        RocketKVLM(pretrained="unused", method="nope")
    with pytest.raises(ValueError, match="loglikelihood="):
        RocketKVLM(pretrained="unused", method="full", loglikelihood="maybe")
    with pytest.raises(ValueError, match="unknown options"):
        RocketKVLM(pretrained="unused", method="full", kernel_size=3)


def test_model_is_registered():
    from lm_eval.api.registry import get_model

    assert get_model("rocketkv") is RocketKVLM


# ---------------------------------------------------------------------- task=lm_eval through our runner
def compose(tmp_path, *extra):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose("config", overrides=[
            "model=tiny-random", "task=lm_eval", f"task.names=[{GEN_TASK}]", f"task.include_path={FIXTURES}",
            "task.include_defaults=false", f"output_dir={tmp_path}", "update_leaderboard=false", "progress=false",
            *extra])


def test_runner_writes_lm_eval_metrics(tmp_path):
    from rocketkv.harness.runner import run

    [metrics] = run(compose(tmp_path, "method=rocketkv", "budget=64"))
    out = Path(metrics["run"]["results_dir"])
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"{GEN_TASK}/{i}" for i in range(4)]
    assert records[1]["references"] == [" blue river"]
    assert records[1]["stats"]["kept_tokens"] < records[1]["prompt_tokens"]
    on_disk = json.loads((out / "metrics.json").read_text())
    sub = on_disk["subtasks"][GEN_TASK]
    assert sub["metric"] == "exact_match,none" and sub["n"] == 4
    assert on_disk["score"] == pytest.approx(100 * sub["metrics"]["exact_match,none"])
    assert on_disk["run"]["complete"] and on_disk["run"]["protocol"]["names"] == [GEN_TASK]

    # resume: nothing is regenerated, the same metrics come back
    [again] = run(compose(tmp_path, "method=rocketkv", "budget=64"))
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert again["subtasks"] == metrics["subtasks"]


def test_runner_sample_matches_lm_eval_request():
    from omegaconf import OmegaConf

    from evals.lm_eval_task import LmEvalTask
    from rocketkv.harness.models import tiny_tokenizer

    task = LmEvalTask(OmegaConf.create({"names": [GEN_TASK], "include_path": str(FIXTURES), "include_defaults": False}))
    samples = task.samples(tiny_tokenizer(), 8192)
    first = samples[0]
    assert first.prompt.startswith("Remember the code: red apple.\n") and first.prompt.endswith("\nThe code was:")
    assert first.stop == ["\n"] and first.max_new_tokens == 6 and not first.chat_template
    assert task.score(first, " Red apple.") == 100.0  # ignore_case / ignore_punctuation from the YAML
    assert task.score(first, " green stone") == 0.0


def test_loglikelihood_tasks_refused_by_lm_eval_task():
    from omegaconf import OmegaConf

    from evals.lm_eval_task import LmEvalTask
    from rocketkv.harness.models import tiny_tokenizer

    task = LmEvalTask(OmegaConf.create({"names": [LL_TASK], "include_path": str(FIXTURES), "include_defaults": False}))
    with pytest.raises(ValueError, match=r"rocketkv_copy_ll.*'loglikelihood'"):
        task.samples(tiny_tokenizer(), 8192)
    with pytest.raises(ValueError, match="needs lm-eval task names"):
        LmEvalTask(OmegaConf.create({"names": []})).validate(8192)


# ---------------------------------------------------------------------- lm-eval's conventions (issue 31)
def test_unknown_model_arg_names_the_key_and_the_valid_ones():
    from rocketkv.harness.lm_eval_model import BridgeError

    with pytest.raises(BridgeError) as err:
        RocketKVLM(pretrained="unused", methd="full")
    message = str(err.value)
    assert "'methd'" in message and "did you mean 'method'" in message
    for valid in ("method", "budget", "loglikelihood", "window", "pretrained", "dtype"):
        assert valid in message


def test_batch_size_other_than_one_is_refused():
    from rocketkv.harness.lm_eval_model import BridgeError

    for size in ("4", 4, "auto"):
        with pytest.raises(BridgeError, match=rf"batch_size={size} is not supported.*one request at a time"):
            RocketKVLM(pretrained="unused", method="full", batch_size=size)


@pytest.mark.parametrize("gen_kwargs,fragment", [
    ("do_sample=True,temperature=0.7", "asks for sampling"),
    ("do_sample=True", "asks for sampling"),
    ("num_beams=4", "['num_beams']"),
])
def test_non_greedy_gen_kwargs_are_refused_before_any_request(tiny, task_manager, gen_kwargs, fragment):
    from rocketkv.harness.lm_eval_model import BridgeError

    model, tok = tiny
    lm = RocketKVLM(pretrained=model, tokenizer=tok, method="full")
    with pytest.raises(BridgeError, match=fragment):
        lm_eval.simple_evaluate(model=lm, tasks=[GEN_TASK], task_manager=task_manager, bootstrap_iters=0,
                                gen_kwargs=gen_kwargs)
    assert lm.request_stats == []


def test_greedy_gen_kwargs_pass(tiny, task_manager):
    model, tok = tiny
    lm = RocketKVLM(pretrained=model, tokenizer=tok, method="full")
    lm_eval.simple_evaluate(model=lm, tasks=[GEN_TASK], task_manager=task_manager, bootstrap_iters=0, limit=1,
                            gen_kwargs="do_sample=False,temperature=0,top_p=0.9,max_gen_toks=3")
    assert len(lm.request_stats) == 1 and lm.request_stats[0]["new_tokens"] <= 3


def test_the_default_method_is_visible(tiny, caplog):
    model, tok = tiny
    lm = RocketKVLM(pretrained=model, tokenizer=tok)
    info = lm.get_model_info()
    assert (info["kv_method"], info["kv_budget"], info["kv_defaults_used"]) == ("rocketkv", 256, ["method", "budget"])
    assert any("running rocketkv@256" in r.message for r in caplog.records)
    chosen = RocketKVLM(pretrained=model, tokenizer=tok, method="full").get_model_info()
    assert (chosen["kv_method"], chosen["kv_budget"], chosen["kv_defaults_used"]) == ("full", None, [])


@pytest.fixture
def restore_logging():
    """lm-eval's command line binds its log handlers to this test's captured stderr: take them off again."""
    import logging

    loggers = [logging.getLogger(name) for name in ("", "lm_eval", "rocketkv")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_help_names_the_model_args_and_defaults(monkeypatch, capsys, restore_logging):
    from rocketkv.harness import lm_eval_cli

    monkeypatch.setattr("sys.argv", ["rocketkv-lm-eval", "run", "--help"])
    with pytest.raises(SystemExit) as done:
        lm_eval_cli.main()
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "method=<name>" in out and "(default: rocketkv)" in out and "(default: 256" in out and "--model_args" in out


def test_documented_module_paths_are_the_bridge():
    import importlib

    alias = importlib.import_module("rocketkv.lm_eval_model")
    assert alias.RocketKVLM is RocketKVLM
    assert importlib.import_module("rocketkv.lm_eval_cli").main is \
        importlib.import_module("rocketkv.harness.lm_eval_cli").main


TWO_METRICS = "rocketkv_copy2"


def two_metric_task(metric=None):
    from omegaconf import OmegaConf

    from evals.lm_eval_task import LmEvalTask

    return LmEvalTask(OmegaConf.create({"names": [TWO_METRICS], "include_path": str(FIXTURES),
                                        "include_defaults": False, "metric": metric}))


def test_task_metric_chooses_the_headline():
    from rocketkv.harness.models import tiny_tokenizer

    records = []
    for task in (two_metric_task(), two_metric_task("contains"), two_metric_task("contains,none")):
        sample = task.samples(tiny_tokenizer(), 8192)[0]
        records.append([{"meta": sample.meta, "prediction": " it was red apple"}])
        headline = 0.0 if task.cfg.metric is None else 100.0
        assert task.score(sample, " it was red apple") == headline
        aggregated = task.aggregate(records[-1])
        sub = aggregated["subtasks"][TWO_METRICS]
        assert sub["metric"] == ("exact,none" if task.cfg.metric is None else "contains,none")
        assert aggregated["score"] == headline and sub["metrics"] == {"exact,none": 0.0, "contains,none": 1.0}
        assert task.metrics_line(aggregated) == " (exact,none 0; contains,none 1)"
    with pytest.raises(ValueError, match=r"task.metric='acc' is not a metric of lm-eval task 'rocketkv_copy2'; "
                                         r"valid: exact,none, contains,none"):
        two_metric_task("acc").validate(8192)


def test_runner_summary_prints_every_metric(tmp_path, capsys):
    from rocketkv.harness.runner import run

    [metrics] = run(compose(tmp_path, "method=full", f"task.names=[{TWO_METRICS}]", "task.metric=contains"))
    sub = metrics["subtasks"][TWO_METRICS]
    assert sub["metric"] == "contains,none" and metrics["score"] == pytest.approx(100 * sub["metrics"]["contains,none"])
    assert metrics["run"]["protocol"]["metric"] == "contains"
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("lm_eval/")][-1]
    assert "exact,none" in line and "contains,none" in line and f"score {metrics['score']:.2f}" in line
