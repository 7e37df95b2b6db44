"""LongBenchTask on the invented fixture files (tests/fixtures/longbench) and, when present, on real rows."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from evals.base import Sample
from evals.longbench.metrics import rouge_score
from evals.longbench.prompts import PROMPT_TEMPLATES
from evals.longbench.task import LongBenchTask

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longbench"
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"

OFFICIAL_ORDER = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
                  "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en",
                  "lcc", "repobench-p"]
# official dataset2maxlen.json, written out independently of evals/longbench/prompts.py
EXPECTED_MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32,
                           "2wikimqa": 32, "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512,
                           "trec": 64, "triviaqa": 32, "samsum": 128, "passage_count": 32,
                           "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
NO_CHAT = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
E_SUBSETS = ["qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
             "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]


def fixture_rows(subset: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{subset}.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets_cache"))


def make_task(cache_dir: str, **options) -> LongBenchTask:
    return LongBenchTask({"name": "longbench", "cache_dir": cache_dir, **options})


@pytest.fixture(scope="module")
def fixture_task(cache_dir) -> LongBenchTask:
    task = make_task(cache_dir, data_dir=str(FIXTURES))
    task.validate(4096)
    return task


@pytest.fixture(scope="module")
def fixture_samples(fixture_task) -> list[Sample]:
    return fixture_task.samples(None, 4096)


def sample_of(samples: list[Sample], subset: str) -> Sample:
    return next(s for s in samples if s.subtask == subset)


# ---------------------------------------------------------------- samples
def test_samples_count_order_and_ids(fixture_samples):
    expected_ids = [f"{subset}/{row['_id']}" for subset in OFFICIAL_ORDER for row in fixture_rows(subset)]
    assert len(expected_ids) == 20
    assert [s.id for s in fixture_samples] == expected_ids
    assert [s.subtask for s in fixture_samples] == [i.split("/")[0] for i in expected_ids]


def test_templates_are_filled_with_context_and_input(fixture_samples):
    rows = {f"{subset}/{row['_id']}": row for subset in OFFICIAL_ORDER for row in fixture_rows(subset)}
    for sample in fixture_samples:
        row = rows[sample.id]
        assert row["context"] in sample.prompt
        assert row["input"] in sample.prompt
        assert "{context}" not in sample.prompt and "{input}" not in sample.prompt
        assert sample.references == row["answers"]
        assert sample.meta == {"length": row["length"], "all_classes": row["all_classes"],
                               "language": row["language"]}


def test_prompt_text_of_two_subsets(fixture_samples):
    row = fixture_rows("hotpotqa")[0]
    assert sample_of(fixture_samples, "hotpotqa").prompt == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other words."
        f"\n\nThe following are given passages.\n{row['context']}\n\nAnswer the question based on the given passages. "
        f"Only give me the answer and do not output any other words.\n\nQuestion: {row['input']}\nAnswer:")
    row = fixture_rows("repobench-p")[0]
    assert sample_of(fixture_samples, "repobench-p").prompt == (
        f"Please complete the code given below. \n{row['context']}{row['input']}Next line of code:\n")


def test_chat_policy_max_new_tokens_and_stop_per_subset(fixture_samples):
    for sample in fixture_samples:
        assert sample.max_new_tokens == EXPECTED_MAX_NEW_TOKENS[sample.subtask], sample.subtask
        assert sample.chat_template == (sample.subtask not in NO_CHAT), sample.subtask
        assert sample.stop == (["\n"] if sample.subtask == "samsum" else []), sample.subtask
        assert sample.answer_prefix == ""


def test_runner_token_ids_follow_the_chat_policy(fixture_samples):
    from rocketkv.harness.models import tiny_tokenizer
    from evals.prompting import prompt_token_ids

    tok = tiny_tokenizer()
    trec = sample_of(fixture_samples, "trec")
    assert prompt_token_ids(tok, trec, True, 4096) == tok(trec.prompt, add_special_tokens=True).input_ids
    qa = sample_of(fixture_samples, "narrativeqa")
    text = tok.decode(prompt_token_ids(tok, qa, True, 4096))
    assert text.startswith("<s>user: You are given a story") and text.endswith("<s>assistant: ")


# ---------------------------------------------------------------- scoring
def test_first_line_rule_for_trec_triviaqa_samsum(fixture_task, fixture_samples):
    trec = sample_of(fixture_samples, "trec")  # reference "Expression abbreviated"
    # first line only: one class found -> 100; the whole text would find 2 classes -> 50
    assert fixture_task.score(trec, "\nExpression abbreviated\nAnimal") == 100.0
    trivia = sample_of(fixture_samples, "triviaqa")  # references ["green", "Green"]
    assert fixture_task.score(trivia, "\n\ngreen\nQuestion: what else?") == 100.0
    samsum = sample_of(fixture_samples, "samsum")
    reference = samsum.references[0]
    assert fixture_task.score(samsum, reference + "\nDialogue: more text") == pytest.approx(100.0, abs=1e-5)


def test_other_subsets_score_the_whole_prediction(fixture_task, fixture_samples):
    nqa = sample_of(fixture_samples, "narrativeqa")  # references ["Gull Rock", "on Gull Rock"]
    # tokens [gull, rock, tobin]: vs [gull, rock] P = 2/3, R = 1, F1 = 0.8 (the second line counts)
    assert fixture_task.score(nqa, "Gull Rock\nTobin") == pytest.approx(80.0)


def test_score_is_max_over_references_times_100(fixture_task, fixture_samples):
    nqa = sample_of(fixture_samples, "narrativeqa")
    # [she, was, on, gull, rock]: vs "Gull Rock" P = 2/5, R = 1, F1 = 4/7; vs "on Gull Rock" P = 3/5, R = 1,
    # F1 = 0.75 -> 75
    assert fixture_task.score(nqa, "She was on Gull Rock.") == pytest.approx(75.0)
    assert fixture_task.score(nqa, "") == 0.0


def test_scores_of_the_other_metrics(fixture_task, fixture_samples):
    assert fixture_task.score(sample_of(fixture_samples, "passage_count"), "3") == 100.0
    assert fixture_task.score(sample_of(fixture_samples, "passage_retrieval_en"), "Paragraph 4, not 2") == 50.0
    lcc = sample_of(fixture_samples, "lcc")
    assert fixture_task.score(lcc, "# ring\n" + lcc.references[0]) == 100.0
    summary = sample_of(fixture_samples, "gov_report")
    assert 0.0 < fixture_task.score(summary, "Eight of twelve offices did not track overtime") < 100.0


# ---------------------------------------------------------------- aggregation
def record(subtask: str, score: float, length: int = 100) -> dict:
    return {"id": f"{subtask}/{score}/{length}", "subtask": subtask, "score": score, "meta": {"length": length},
            "prediction": "", "references": []}


def test_aggregate_arithmetic(fixture_task):
    records = [record("narrativeqa", 20), record("narrativeqa", 40), record("qasper", 50), record("hotpotqa", 10),
               record("trec", 60), record("passage_count", 0), record("passage_count", 100), record("lcc", 80)]
    out = fixture_task.aggregate(records)
    assert out["subtasks"] == {"narrativeqa": {"score": 30.0, "n": 2}, "qasper": {"score": 50.0, "n": 1},
                               "hotpotqa": {"score": 10.0, "n": 1}, "trec": {"score": 60.0, "n": 1},
                               "passage_count": {"score": 50.0, "n": 2}, "lcc": {"score": 80.0, "n": 1}}
    # categories: mean of the present tasks; Summarization has none and is left out
    assert out["categories"] == {"Single-doc QA": 40.0, "Multi-doc QA": 10.0, "Few-shot": 60.0,
                                 "Synthetic": 50.0, "Code": 80.0}
    # lb_avg leaves out passage_count: (30 + 50 + 10 + 60 + 80) / 5 = 46
    assert out["lb_avg"] == pytest.approx(46.0)
    assert out["score"] == out["lb_avg"]
    # mean_all: (230 + 50) / 6
    assert out["mean_all"] == pytest.approx(280 / 6)
    assert "length_buckets" not in out


def test_aggregate_of_passage_count_alone_has_no_lb_avg(fixture_task):
    out = fixture_task.aggregate([record("passage_count", 40)])
    assert math.isnan(out["lb_avg"])
    assert out["score"] == out["mean_all"] == 40.0


# ---------------------------------------------------------------- LongBench-E
@pytest.fixture(scope="module")
def e_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("longbench_e")
    for subset in E_SUBSETS:
        shutil.copy(FIXTURES / f"{subset}.jsonl", folder / f"{subset}_e.jsonl")
    return folder


def test_longbench_e_loads_its_13_subsets(cache_dir, e_dir):
    task = make_task(cache_dir, data_dir=str(e_dir), variant="e")
    task.validate(4096)
    samples = task.samples(None, 4096)
    assert [s.subtask for s in samples] == [s for s in E_SUBSETS for _ in fixture_rows(s)]
    assert task.protocol()["variant"] == "e"


def test_longbench_e_length_buckets(cache_dir, e_dir):
    task = make_task(cache_dir, data_dir=str(e_dir), variant="e")
    records = [record("qasper", 10, 100), record("qasper", 30, 3999), record("qasper", 50, 4000),
               record("qasper", 70, 7999), record("qasper", 90, 8000), record("trec", 40, 9000)]
    out = task.aggregate(records)
    assert out["subtasks"]["qasper"]["length_buckets"] == {
        "0-4k": {"score": 20.0, "n": 2}, "4-8k": {"score": 60.0, "n": 2}, "8k+": {"score": 90.0, "n": 1}}
    assert out["subtasks"]["trec"]["length_buckets"] == {"8k+": {"score": 40.0, "n": 1}}
    # per bucket, the mean over the tasks that have samples in it: 8k+ = (90 + 40) / 2
    assert out["length_buckets"] == {"0-4k": {"score": 20.0, "n_tasks": 1}, "4-8k": {"score": 60.0, "n_tasks": 1},
                                     "8k+": {"score": 65.0, "n_tasks": 2}}


def test_longbench_e_has_no_narrativeqa(cache_dir, e_dir):
    with pytest.raises(ValueError, match="unknown LongBench subset.*narrativeqa.*valid: .*qasper"):
        make_task(cache_dir, data_dir=str(e_dir), variant="e", subsets=["narrativeqa"]).validate(4096)


# ---------------------------------------------------------------- options and errors
def test_subsets_option_selects_and_orders(cache_dir):
    task = make_task(cache_dir, data_dir=str(FIXTURES), subsets=["trec", "qasper", "trec"])
    task.validate(4096)
    assert [s.id for s in task.samples(None, 4096)] == ["trec/trc-1", "trec/trc-2", "qasper/qas-1", "qasper/qas-2"]
    protocol = task.protocol()
    assert protocol["subsets"] == ["trec", "qasper"]
    assert set(protocol["data"]["sha256"]) == {"trec", "qasper"}
    assert protocol["templates"]["trec"] == PROMPT_TEMPLATES["trec"]


def test_unknown_subset_lists_valid_ones(cache_dir):
    with pytest.raises(ValueError, match=r"unknown LongBench subset\(s\) \['nope'\].*valid: .*narrativeqa"):
        make_task(cache_dir, data_dir=str(FIXTURES), subsets=["nope"]).validate(4096)


def test_unknown_variant(cache_dir):
    with pytest.raises(ValueError, match="task.variant='v3' is not valid"):
        make_task(cache_dir, data_dir=str(FIXTURES), variant="v3").validate(4096)


def test_missing_data_dir_names_the_path(cache_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"task.data_dir={missing}: no such folder"):
        make_task(cache_dir, data_dir=str(missing)).validate(4096)


def test_missing_subset_file_names_file_and_found_subsets(cache_dir, tmp_path):
    shutil.copy(FIXTURES / "qasper.jsonl", tmp_path / "qasper.jsonl")
    with pytest.raises(FileNotFoundError) as err:
        make_task(cache_dir, data_dir=str(tmp_path), subsets=["qasper", "trec"]).validate(4096)
    assert str(tmp_path / "trec.jsonl") in str(err.value)
    assert "['qasper']" in str(err.value)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("field, bad_value, message", [
    ("answers", None, "field 'answers' is missing"),
    ("answers", "Weldon", "field 'answers' must be a non-empty list of strings"),
    ("length", "12", "field 'length' must be an integer"),
    ("_id", 7, "field '_id' must be a string"),
])
def test_malformed_row_names_file_row_and_field(cache_dir, tmp_path, field, bad_value, message):
    rows = fixture_rows("qasper") + [dict(fixture_rows("qasper")[0], _id="qas-3")]
    if bad_value is None:
        del rows[1][field]
    else:
        rows[1][field] = bad_value
    path = tmp_path / "qasper.jsonl"
    write_rows(path, rows)
    with pytest.raises(ValueError) as err:
        make_task(cache_dir, data_dir=str(tmp_path), subsets=["qasper"]).validate(4096)
    assert f"{path}, row 2: {message}" in str(err.value)


def test_invalid_json_line_names_file_and_row(cache_dir, tmp_path):
    path = tmp_path / "qasper.jsonl"
    path.write_text(json.dumps(fixture_rows("qasper")[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{path}, row 2: not valid JSON"):
        make_task(cache_dir, data_dir=str(tmp_path), subsets=["qasper"]).validate(4096)


def test_classification_rows_need_their_classes(cache_dir, tmp_path):
    rows = fixture_rows("trec")
    rows[0]["all_classes"] = None
    write_rows(tmp_path / "trec.jsonl", rows)
    with pytest.raises(ValueError, match="row 1: field 'all_classes' must list the class names"):
        make_task(cache_dir, data_dir=str(tmp_path), subsets=["trec"]).validate(4096)


def test_repeated_ids_are_refused(cache_dir, tmp_path):
    rows = fixture_rows("qasper")
    rows[1]["_id"] = rows[0]["_id"]
    write_rows(tmp_path / "qasper.jsonl", rows)
    with pytest.raises(ValueError, match="row 2: _id 'qas-1' repeats row 1"):
        make_task(cache_dir, data_dir=str(tmp_path), subsets=["qasper"]).validate(4096)


def test_unreachable_hub_without_data_dir_names_both_options(cache_dir, monkeypatch):
    import datasets
    import huggingface_hub

    # The offline switches are read when the libraries are imported, so set the module constants as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = make_task(cache_dir, subsets=["qasper"], hub_repo="Xnhyacinth/LongBench", hub_revision="0" * 40)
    with pytest.raises(ValueError) as err:
        task.validate(4096)
    assert "task.data_dir=" in str(err.value) and "task.hub_repo" in str(err.value)
    assert task.protocol()["data"] == {"source": "hub", "repo": "Xnhyacinth/LongBench", "revision": "0" * 40,
                                       "split": "test"}


def test_model_too_short_for_the_generation_length(cache_dir):
    with pytest.raises(ValueError, match="model max length 512 leaves no room.*gov_report"):
        make_task(cache_dir, data_dir=str(FIXTURES), subsets=["gov_report"]).validate(512)


def test_protocol_follows_the_data_files(cache_dir, tmp_path):
    shutil.copy(FIXTURES / "qasper.jsonl", tmp_path / "qasper.jsonl")
    before = make_task(cache_dir, data_dir=str(tmp_path), subsets=["qasper"]).protocol()
    with open(tmp_path / "qasper.jsonl", "a") as f:
        f.write(json.dumps(dict(fixture_rows("qasper")[0], _id="qas-9")) + "\n")
    after = make_task(cache_dir, data_dir=str(tmp_path), subsets=["qasper"]).protocol()
    assert before["data"]["sha256"]["qasper"] != after["data"]["sha256"]["qasper"]
    assert {k: v for k, v in before.items() if k != "data"} == {k: v for k, v in after.items() if k != "data"}


# ---------------------------------------------------------------- Chinese subsets
def zh_row(dataset: str, _id: str, context: str, question: str, answers: list[str], classes=None) -> dict:
    return {"input": question, "context": context, "answers": answers, "length": len(context), "dataset": dataset,
            "language": "zh", "all_classes": classes, "_id": _id}


@pytest.mark.skipif(importlib.util.find_spec("jieba") is not None, reason="jieba is installed")
def test_zh_subsets_needing_jieba_are_refused_without_it(cache_dir):
    with pytest.raises(ValueError, match=r"\['multifieldqa_zh', 'vcsum'\].*pip install jieba"):
        make_task(cache_dir, data_dir=str(FIXTURES), subsets=["multifieldqa_zh", "lsht", "vcsum"]).validate(4096)


def test_zh_subsets_without_jieba_metrics_run(cache_dir, tmp_path):
    write_rows(tmp_path / "passage_retrieval_zh.jsonl",
               [zh_row("passage_retrieval_zh", "prz-1", "段落1：河水很清。\n\n段落2：山很高。", "山很高", ["段落2"])])
    write_rows(tmp_path / "lsht.jsonl",
               [zh_row("lsht", "lsh-1", "新闻：球队赢了。\n类别：体育", "新闻：股市上涨。\n类别：", ["财经"],
                       ["体育", "财经", "科技"])])
    task = make_task(cache_dir, data_dir=str(tmp_path), subsets=["passage_retrieval_zh", "lsht"])
    task.validate(4096)
    retrieval, lsht = task.samples(None, 4096)
    assert retrieval.chat_template and retrieval.max_new_tokens == 32 and "山很高" in retrieval.prompt
    assert not lsht.chat_template and lsht.max_new_tokens == 64
    assert task.score(retrieval, "段落2") == 100.0
    assert task.score(lsht, "财经\n体育") == 100.0  # first line only, as for trec
    out = task.aggregate([record("passage_retrieval_zh", 100.0), record("lsht", 50.0)])
    assert out["categories"] == {} and math.isnan(out["lb_avg"]) and out["score"] == out["mean_all"] == 75.0


# ---------------------------------------------------------------- real rows (never copied into the repo)
@pytest.mark.skipif(not (REAL_DATA / "multi_news.jsonl").is_file(),
                    reason=f"real LongBench rows not found at {REAL_DATA / 'multi_news.jsonl'}")
def test_real_multi_news_rows(cache_dir):
    task = make_task(cache_dir, data_dir=str(REAL_DATA), subsets=["multi_news"])
    task.validate(32768)
    samples = task.samples(None, 32768)[:3]
    with open(REAL_DATA / "multi_news.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    for sample, row in zip(samples, rows):
        assert sample.id == f"multi_news/{row['_id']}"
        assert sample.prompt == PROMPT_TEMPLATES["multi_news"].format(context=row["context"], input=row["input"])
        assert sample.prompt.startswith("You are given several news passages. Write a one-page summary of all news.")
        assert sample.prompt.endswith("Now, write a one-page summary of all the news.\n\nSummary:")
        assert sample.max_new_tokens == 512 and sample.chat_template and sample.stop == []
        reference = sample.references[0]
        assert rouge_score(reference, reference) == pytest.approx(1.0, abs=1e-6)
        words = reference.split()
        truncated = " ".join(words[: len(words) // 2])
        assert 0.0 < rouge_score(truncated, reference) < 1.0
        assert 0.0 < task.score(sample, truncated) < 100.0
