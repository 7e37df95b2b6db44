"""End-to-end runs on the real rows in ``../shared/data`` (developers and CI only; skipped in users' clones)."""
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from rocketkv.harness.runner import run

MULTI_NEWS = SHARED_DATA / "longbench" / "multi_news.jsonl"
SQUAD = SHARED_DATA / "squad" / "dev-v2.0.json"
COMMON = ["model=tiny-random", "update_leaderboard=false", "progress=false", "method=rocketkv", "budget=128"]


@pytest.mark.slow  # 2 x 512 generated tokens: minutes on 2 cores; the loader/prompt/ROUGE check on these rows
# runs by default in test_longbench_task.py
@pytest.mark.skipif(not MULTI_NEWS.is_file(), reason=f"real LongBench rows not found at {MULTI_NEWS}")
def test_longbench_multi_news_run(compose_cfg, tmp_path):
    cfg = compose_cfg(*COMMON, "task=longbench", f"task.data_dir={MULTI_NEWS.parent}", "task.subsets=[multi_news]",
                      "model.max_len=2048", f"task.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path}", "limit=2")
    [metrics] = run(cfg)
    preds = [json.loads(x) for x in (Path(metrics["run"]["results_dir"]) / "predictions.jsonl").open()]
    rows = [json.loads(x) for _, x in zip(range(2), MULTI_NEWS.open())]
    assert [p["id"] for p in preds] == [f"multi_news/{r['_id']}" for r in rows]
    for p, r in zip(preds, rows):
        assert p["references"] == r["answers"] and 0.0 <= p["score"] <= 100.0
        assert p["prompt_tokens"] <= 2048 - 512  # truncated in the middle to the model's context
        assert p["stats"]["kept_tokens"] < p["prompt_tokens"]  # RocketKV evicted part of the long prompt
    assert metrics["n_samples"] == 2 and "multi_news" in metrics["subtasks"]


@pytest.mark.skipif(not SQUAD.is_file(), reason=f"real SQuAD 2.0 dev set not found at {SQUAD}")
def test_ruler_qa_1_from_real_squad_run(compose_cfg, tmp_path):
    cfg = compose_cfg(*COMMON, "task=ruler", "task.tasks=[qa_1]", "task.max_seq_length=[1024]",
                      f"task.qa_dir={SQUAD.parent}", f"task.cache_dir={tmp_path / 'cache'}", "task.num_samples=2",
                      f"output_dir={tmp_path}")
    [metrics] = run(cfg)
    preds = [json.loads(x) for x in (Path(metrics["run"]["results_dir"]) / "predictions.jsonl").open()]
    squad = json.loads(SQUAD.read_text())
    answers = {qa["id"]: [a["text"] for a in qa["answers"]] for a in squad["data"] for p in a["paragraphs"]
               for qa in p["qas"] if not qa.get("is_impossible")}
    assert len(preds) == 2
    for p in preds:
        assert any(set(p["references"]) == set(a) for a in answers.values())
        assert p["prompt_tokens"] <= 1024 and 0.0 <= p["score"] <= 100.0  # whole SQuAD paragraphs: a coarse fit
    assert metrics["n_samples"] == 2 and set(metrics["subtasks"]) == {"qa_1"}
