"""Multi-turn tasks through the runner: ``task=multiturn`` (generated key-value retrieval) and ``task=scbench``
(SCBench's jsonl format, read from a hand-written fixture), scored per turn, one record per conversation,
resumable."""
import json
from pathlib import Path

import pytest

from conftest import REPO
from evals.multiturn.task import MultiTurnTask
from evals.prompting import conversation_token_ids
from evals.scbench.task import SCBenchTask, kv_retrieval, string_match_all
from rocketkv.harness.models import tiny_tokenizer
from rocketkv.harness.runner import run

FIXTURE = REPO / "tests" / "fixtures" / "scbench"
RUN = ["model=tiny-random", "update_leaderboard=false", "progress=false"]


def read_predictions(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "predictions.jsonl").read_text().splitlines()]


def test_multiturn_samples_ask_each_key_once():
    task = MultiTurnTask({"lengths": [400], "turns": 3, "needles": 5, "repeats": 2, "seed": 1})
    tok = tiny_tokenizer()
    samples = task.samples(tok, 8192)
    assert [s.id for s in samples] == ["len400_turns3_rep0", "len400_turns3_rep1"]
    for s in samples:
        assert len(s.turns) == 3 and s.stop == ["\n"]
        keys = [t.meta["key"] for t in s.turns]
        assert len(set(keys)) == 3
        for turn in s.turns:
            key, value = turn.meta["key"], turn.references[0]
            assert f"The value of key {key} is {value}." in s.prompt and f"value of key {key}?" in turn.prompt
            assert key not in s.prompt.replace(f"The value of key {key} is {value}.", "")  # asked, never leaked
        turns = conversation_token_ids(tok, s, 8192)
        assert len(turns) == 3 and 0.8 * 400 <= len(turns[0]) - len(turns[1]) <= 410
        assert tok.decode(turns[2]).strip().startswith("Question: What is the value of key")
    assert samples[0].turns[0].meta["key"] != samples[1].turns[0].meta["key"]
    s = samples[0]
    value = s.turns[1].references[0]
    assert task.score_turn(s, 1, f" {value}.") == 100.0
    assert task.score_turn(s, 1, f" {value[:-1]}") == 0.0 and task.score_turn(s, 1, f" 12 then {value}") == 0.0


def test_multiturn_options_are_checked():
    with pytest.raises(ValueError, match="task.needles=2 is below task.turns=3"):
        MultiTurnTask({"turns": 3, "needles": 2})
    with pytest.raises(ValueError, match="task.turns=0 is not valid"):
        MultiTurnTask({"turns": 0})


def test_multiturn_through_the_runner_scores_each_turn_and_resumes(compose_cfg, tmp_path):
    args = [*RUN, "task=multiturn", "task.lengths=[300]", "task.repeats=2", "task.max_new_tokens=6",
            "method=rocketkv_mt", "budget=64", f"output_dir={tmp_path}"]
    [first] = run(compose_cfg(*args, "limit=1"))
    out = Path(first["run"]["results_dir"])
    [record] = read_predictions(out)
    assert record["id"] == "len300_turns3_rep0" and len(record["turns"]) == 3
    assert [t["turn"] for t in record["turns"]] == [0, 1, 2]
    for turn in record["turns"]:
        assert 1 <= turn["new_tokens"] <= 6 and turn["score"] in (0.0, 100.0) and turn["references"]
    assert record["score"] == pytest.approx(sum(t["score"] for t in record["turns"]) / 3)
    assert record["budget_params"]["dense"] is False and record["stats"]["stored_kv_bytes"] > 0
    assert set(first["subtasks"]) == {"len=300", "len=300/turn1", "len=300/turn2", "len=300/turn3"}
    assert first["n_turns"] == 3

    [second] = run(compose_cfg(*args))  # resumes: the finished conversation is kept, the other one added
    records = read_predictions(out)
    assert [r["id"] for r in records] == ["len300_turns3_rep0", "len300_turns3_rep1"]
    assert records[0] == record and second["n_samples"] == 2 and second["n_turns"] == 6
    [third] = run(compose_cfg(*args))  # complete: nothing runs again
    assert len(read_predictions(out)) == 2 and third["score"] == second["score"]


def test_scbench_fixture_loads_with_official_templates():
    task = SCBenchTask({"data_dir": str(FIXTURE)})
    samples = task.samples(tiny_tokenizer(), 8192)
    assert [s.id for s in samples] == ["scbench_kv-0", "scbench_kv-1", "scbench_prefix_suffix-0", "scbench_vt-0"]
    kv = samples[0]
    assert kv.prompt.startswith("Extract the value corresponding to the specified key in the JSON object below.\n\n{")
    assert kv.turns[0].prompt.startswith("\n\nKey: \"7a2d4e9c") and kv.max_new_tokens == 150
    # a later turn starts with the previous turn's gold answer (SCBench's golden context)
    assert kv.turns[1].prompt.startswith("\n\n4c8e1f0a-6b2d-49e7-8a3c-d5f71b2e9064\n\nKey: \"5d1b8f3e")
    vt = samples[3]
    assert vt.turns[0].references == ["QWRTZ", "LMPNA", "DKUSV"] and vt.max_new_tokens == 30
    assert vt.turns[1].prompt.startswith("\n\nQWRTZ, LMPNA, DKUSV\n\nQuestion:")
    plain = SCBenchTask({"data_dir": str(FIXTURE), "golden_context": False, "subsets": ["scbench_kv"],
                         "max_turns": 1}).samples(tiny_tokenizer(), 8192)
    assert len(plain) == 2 and len(plain[0].turns) == 1


def test_scbench_official_metrics():
    assert kv_retrieval("The value is 4c8e1f0a-6b2d.", "4c8e1f0a-6b2d") == 1.0
    assert kv_retrieval("the value is 4C8E1F0A-6B2D", "4c8e1f0a-6b2d") == 0.0  # case-sensitive, as InfiniteBench
    assert string_match_all("qwrtz and LMPNA", ["QWRTZ", "LMPNA", "DKUSV"]) == 0.67
    task = SCBenchTask({"data_dir": str(FIXTURE)})
    kv, _, ps, vt = task.samples(tiny_tokenizer(), 8192)
    assert task.score_turn(kv, 1, " f2b6c9d1-7e3a-4058-a1d4-8c6e2f9b3a07") == 100.0
    assert task.score_turn(kv, 1, " 4c8e1f0a-6b2d-49e7-8a3c-d5f71b2e9064") == 0.0  # turn 0's answer
    assert task.score_turn(ps, 0, "wrubegtosyal") == 100.0
    assert task.score_turn(vt, 1, "OXBEF") == 50.0 and task.score_turn(vt, 0, "QWRTZ, LMPNA, DKUSV") == 100.0


def test_scbench_without_data_says_where_to_get_it(tmp_path):
    with pytest.raises(ValueError, match="huggingface.co/datasets/microsoft/SCBench.*task.data_dir"):
        SCBenchTask({}).validate(8192)
    with pytest.raises(FileNotFoundError, match=f"task.data_dir={tmp_path}: neither {tmp_path}/scbench_kv.jsonl"):
        SCBenchTask({"data_dir": str(tmp_path)}).validate(8192)
    with pytest.raises(ValueError, match="task.subsets: \\['scbench_qa_eng'\\] not supported"):
        SCBenchTask({"data_dir": str(FIXTURE), "subsets": ["scbench_qa_eng"]})


def test_scbench_fixture_through_the_runner(compose_cfg, tmp_path):
    [metrics] = run(compose_cfg(*RUN, "task=scbench", f"task.data_dir={FIXTURE}", "task.max_new_tokens=4",
                                "method=snapkv", "budget=64", "method.selection=group", f"output_dir={tmp_path}"))
    records = read_predictions(metrics["run"]["results_dir"])
    assert len(records) == 4 and all(len(r["turns"]) == 2 for r in records)
    assert metrics["n_turns"] == 8 and {"scbench_kv", "scbench_vt/turn2"} <= set(metrics["subtasks"])
    for r in records:
        task = SCBenchTask({"data_dir": str(FIXTURE)})
        sample = {s.id: s for s in task.samples(tiny_tokenizer(), 8192)}[r["id"]]
        assert [t["score"] for t in r["turns"]] == [task.score_turn(sample, i, t["prediction"])
                                                    for i, t in enumerate(r["turns"])]
