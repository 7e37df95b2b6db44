"""The query-agnostic mode (``task.query_aware=false``): each task's prompt splits into context and question along
its template, the context is compressed before the question is fed, full KV answers exactly as in the query-aware
mode, a grid's shared prefill equals separate runs, and the mode has its own folders, protocol and leaderboard
rows."""
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from evals.longbench.prompts import PROMPT_TEMPLATES, build_prompt, question_part
from evals.needle.task import NeedleTask
from evals.prompting import context_length, prompt_token_ids
from evals.ruler.task import RulerTask
from rocketkv.core.methods.snapkv import SnapKV
from rocketkv.harness.models import tiny_tokenizer
from rocketkv.harness.report import update_leaderboard
from rocketkv.harness.runner import run

NEEDLE = ["model=tiny-random", "task=needle", "task.lengths=[300,600]", "task.depths=[0.0,0.5]", "progress=false",
          "update_leaderboard=false"]
AGNOSTIC = "task.query_aware=false"


def predictions(metrics):
    path = Path(metrics["run"]["results_dir"]) / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_split_is_where_the_question_starts_in_the_final_tokens():
    tok = tiny_tokenizer()
    for chat in (False, True):
        for sample in NeedleTask({"lengths": [300], "depths": [0.5], "chat_template": chat}).samples(tok, 8192):
            ids = prompt_token_ids(tok, sample, True, 8192)
            split = context_length(tok, ids, sample)
            assert sample.prompt.endswith(sample.question) and sample.question.startswith("What is the pass key?")
            assert sample.question in tok.decode(ids[split:]) and sample.question not in tok.decode(ids[split + 1:])
            assert "pass key is" in tok.decode(ids[:split])  # the needle stays in the context
    sample = NeedleTask({"lengths": [300], "depths": [0.5]}).samples(tok, 8192)[0]
    sample.question = "a question nowhere in the prompt"
    with pytest.raises(ValueError, match="no question part"):
        context_length(tok, prompt_token_ids(tok, sample, True, 8192), sample)


def test_longbench_and_ruler_questions_follow_their_templates():
    for subset, template in PROMPT_TEMPLATES.items():
        prompt = build_prompt(subset, "CONTEXT", "INPUT")
        question = question_part(subset, "INPUT")
        assert prompt == prompt[:prompt.index("CONTEXT") + 7] + question  # everything after the context
        assert ("INPUT" in question) == ("{input}" in template)
    tok = tiny_tokenizer()
    task = RulerTask({"tasks": ["niah_single_1", "vt", "qa_1"], "num_samples": 1, "max_seq_length": [1024],
                      "qa_dir": str(REPO / "tests" / "fixtures" / "ruler_qa"), "qa_hub": False, "use_cache": False})
    for sample in task.samples(tok, 8192):
        assert sample.prompt.endswith(sample.question)
        assert sample.question.lstrip().startswith(("What", "Question", "Answer the question"))
        assert len(sample.question) < 300 < len(sample.prompt)


RUNS = {
    "needle": NEEDLE,
    "multiturn": ["model=tiny-random", "task=multiturn", "task.lengths=[400]", "task.repeats=2"],
    # lcc: no question, its instruction after the context is fed late
    "longbench": ["model=tiny-random", "task=longbench", f"task.data_dir={REPO / 'tests' / 'fixtures' / 'longbench'}",
                  "task.subsets=[hotpotqa,lcc]", "limit=1"],
}


@pytest.mark.parametrize("task", list(RUNS))
def test_full_kv_answers_identically_in_both_modes(compose_cfg, tmp_path, task):
    args = [*RUNS[task], "progress=false", "update_leaderboard=false"]
    [aware] = run(compose_cfg(*args, f"output_dir={tmp_path}", "method=full"))
    [agnostic] = run(compose_cfg(*args, f"output_dir={tmp_path}", "method=full", AGNOSTIC))
    a, b = predictions(aware), predictions(agnostic)
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b] and len(a) >= 2
    assert [r["prompt_tokens"] for r in a] == [r["prompt_tokens"] for r in b]
    if task != "multiturn":
        assert all(0 < r["context_tokens"] < r["prompt_tokens"] for r in b)
    assert Path(aware["run"]["results_dir"]).parts[-5] == task
    assert Path(agnostic["run"]["results_dir"]).parts[-5] == f"{task}.query_agnostic"
    assert agnostic["run"]["protocol"]["query_aware"] is False and "query_aware" not in aware["run"]["protocol"]
    assert aware["run"]["protocol_hash"] != agnostic["run"]["protocol_hash"]


def test_the_context_is_compressed_before_the_question(compose_cfg, tmp_path, monkeypatch):
    """SnapKV (and RocketKV's stage 1) select with the context's last window: compression runs over the context
    only, and the question's tokens are all in the cache afterwards."""
    seen = []
    real = SnapKV.compress
    monkeypatch.setattr(SnapKV, "compress", lambda self, layer, q, n, plan, s: (seen.append(n), real(self, layer, q, n,
                                                                                                      plan, s))[1])
    [aware] = run(compose_cfg(*NEEDLE, f"output_dir={tmp_path}", "method=snapkv", "budget=256", "limit=1"))
    prompt_tokens = predictions(aware)[0]["prompt_tokens"]
    assert set(seen) == {prompt_tokens - 1}  # query-aware: over the prompt, less the last token (decoded)
    seen.clear()
    [agnostic] = run(compose_cfg(*NEEDLE, f"output_dir={tmp_path}", "method=snapkv", "budget=256", "limit=1", AGNOSTIC))
    record = predictions(agnostic)[0]
    assert set(seen) == {record["context_tokens"] - 1} and record["context_tokens"] < prompt_tokens
    assert record["budget_params"] == predictions(aware)[0]["budget_params"]  # the same plan in both modes


def test_grid_from_the_shared_context_prefill_equals_separate_runs(compose_cfg, tmp_path):
    methods = ["full", "snapkv", "rocketkv", "streamingllm", "adakv"]
    grid = run(compose_cfg(*NEEDLE, f"output_dir={tmp_path / 'grid'}", AGNOSTIC, "limit=2",
                           f"grid.methods=[{','.join(methods)}]", "grid.budgets=[128]"))
    assert len(grid) == len(methods)
    for cell in grid:
        info = cell["run"]
        budget = [] if info["budget"] is None else [f"budget={info['budget']}"]
        [alone] = run(compose_cfg(*NEEDLE, f"output_dir={tmp_path / 'alone'}", AGNOSTIC, "limit=2",
                                  f"method={info['method']}", *budget))
        keep = ("id", "prediction", "context_tokens", "new_tokens", "stats", "budget_params")
        assert [{k: r[k] for k in keep} for r in predictions(cell)] == \
            [{k: r[k] for k in keep} for r in predictions(alone)], info["method"]


def test_leaderboard_shows_the_mode_and_compares_within_it(compose_cfg, tmp_path):
    for mode in ([], [AGNOSTIC]):
        run(compose_cfg(*NEEDLE, f"output_dir={tmp_path}", "limit=2", *mode, "grid.methods=[full,streamingllm]",
                        "grid.budgets=[64]"))
    update_leaderboard(tmp_path, plots=False)
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert sorted(zip(board["task"], board["query_aware"])) == [("needle", True), ("needle", True),
                                                                ("needle.query_agnostic", False),
                                                                ("needle.query_agnostic", False)]
    for _, row in board[board["method"] == "streamingllm"].iterrows():
        full = board[(board["method"] == "full") & (board["task"] == row["task"])].iloc[0]
        assert row["full_config_hash"] == full["config_hash"]


def test_bad_or_unsupported_mode_is_one_clear_error(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="task.query_aware='maybe' is not valid; use true or false"):
        run(compose_cfg(*NEEDLE, f"output_dir={tmp_path}", "task.query_aware=maybe"))
    with pytest.raises(ValueError, match="task.query_aware=false is not supported by task=efficiency"):
        run(compose_cfg("model=tiny-random", "task=efficiency", f"output_dir={tmp_path}", "+task.query_aware=false"))
