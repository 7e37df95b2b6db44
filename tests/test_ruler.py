"""RULER task generation, fitting, scoring and caching, offline with the 1024-token test tokenizer.

The test tokenizer spends about three times as many tokens per word as a real one, so vt and cwe -- whose
smallest prompts (worked example + template) exceed 512 of its tokens -- are checked at longer targets.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from evals.ruler import task as task_module
from evals.ruler.metrics import string_match_all, string_match_part
from evals.ruler.task import RulerTask
from evals.ruler.templates import QA_TASKS, TASKS
from rocketkv.harness.models import tiny_tokenizer
from evals.prompting import prompt_token_ids

FIXTURE_QA = Path(__file__).resolve().parent / "fixtures" / "ruler_qa"
REAL_SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"
MODEL_MAX = 1 << 20
SYNTHETIC = [t for t in TASKS if t not in QA_TASKS]
LENGTHS = {"vt": (1024, 2048), "cwe": (2048, 8192)}  # others: (512, 1024)
NUM_SAMPLES = 3


def make_task(tmp_path=None, **cfg) -> RulerTask:
    base = {"num_samples": NUM_SAMPLES, "qa_hub": False, "use_cache": tmp_path is not None,
            "cache_dir": str(tmp_path / "cache") if tmp_path is not None else None}
    return RulerTask({**base, **cfg})


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def generated(tok):
    """{(task, length): samples}, generated once for the module."""
    out = {}
    for name in SYNTHETIC:
        for length in LENGTHS.get(name, (512, 1024)):
            out[name, length] = make_task(tasks=[name], max_seq_length=length).samples(tok, MODEL_MAX)
    return out


def total_tokens(tok, sample) -> int:
    return len(prompt_token_ids(tok, sample, model_chat=True, model_max_len=MODEL_MAX)) + sample.max_new_tokens


def cases():
    return [(name, length) for name in SYNTHETIC for length in LENGTHS.get(name, (512, 1024))]


@pytest.mark.parametrize("name,length", cases())
def test_fits_last_tenth_of_target(tok, generated, name, length):
    for s in generated[name, length]:
        total = total_tokens(tok, s)
        assert 0.9 * length <= total <= length, (s.id, total)
        assert s.meta["prompt_tokens"] + s.max_new_tokens == total
        assert s.meta["length"] == length and s.subtask == name and s.chat_template


@pytest.mark.parametrize("name,length", cases())
def test_ids_prefix_and_generation_length(generated, name, length):
    samples = generated[name, length]
    assert [s.id for s in samples] == [f"{name}/{length}/{i}" for i in range(NUM_SAMPLES)]
    expected = {"niah": 128, "variable_tracking": 30, "common_words": 120, "freq_words": 50}[TASKS[name].family]
    assert all(s.max_new_tokens == expected and s.answer_prefix.startswith(" ") for s in samples)


@pytest.mark.parametrize("name,length", cases())
def test_scores_full_none_and_partial(generated, name, length):
    task = make_task(tasks=[name])
    for s in generated[name, length]:
        assert task.score(s, " ".join(s.references)) == 100.0
        assert task.score(s, "I do not know.") == 0.0
        if len(s.references) > 1:
            half = s.references[: len(s.references) // 2]
            expected = 100.0 * sum(r.lower() in " ".join(half).lower() for r in s.references) / len(s.references)
            assert task.score(s, " ".join(half)) == pytest.approx(expected)
            assert 0 < task.score(s, " ".join(half)) < 100


@pytest.mark.parametrize("name", [n for n in SYNTHETIC if n.startswith("niah")])
def test_niah_needles_in_context(generated, name):
    spec = TASKS[name].params
    for s in generated[name, 1024]:
        assert len(s.references) == spec["num_values"] * spec["num_queries"]
        needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", s.prompt)
        by_key: dict[str, list[str]] = {}
        for key, value in needles:
            by_key.setdefault(key, []).append(value)
        asked = [v for key, values in by_key.items() if key in s.answer_prefix for v in values]
        assert sorted(asked) == sorted(s.references)
        for ref in s.references:
            assert s.prompt.count(ref) == 1, ref
        if spec["haystack"] != "needle":
            assert len(needles) == spec["num_keys"] * spec["num_values"]
        single = spec["num_values"] * spec["num_queries"] == 1
        assert ("A special magic" in s.prompt) == single
        assert s.answer_prefix.endswith(" is" if single else " are")
        if single:
            assert 0 <= s.meta["depth"] <= 100
        if spec["haystack"] == "noise":
            assert "The grass is green. The sky is blue." in s.prompt


def test_vt_chain_answers(generated):
    for s in generated["vt", 2048]:
        question = s.prompt.split("\n\n")[-2:]  # after the worked example
        text = "\n\n".join(question)
        value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        assert f"assgined the value {value}, they are:" in s.answer_prefix
        first = re.search(rf"VAR ([A-Z]{{5}}) = {value}", text).group(1)
        chain, current = [first], first
        while m := re.search(rf"VAR ([A-Z]{{5}}) = VAR {current}\b", text):
            current = m.group(1)
            chain.append(current)
        assert chain == s.references and len(chain) == 5


@pytest.mark.parametrize("length", LENGTHS["cwe"])
def test_cwe_answers_are_the_frequent_words(generated, length):
    common, rare = (6, 1) if length < 4096 else (30, 3)
    for s in generated["cwe", length]:
        question = s.prompt.rsplit("Below is a numbered list of words.", 1)[1]
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", question))
        assert {counts[w] for w in s.references} == {common} and len(s.references) == 10
        assert {c for w, c in counts.items() if w not in s.references} == {rare}


@pytest.mark.parametrize("length", (512, 1024))
def test_fwe_answers_are_the_frequent_words(generated, length):
    for s in generated["fwe", length]:
        text = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = Counter(w for w in text.split() if w != "...")
        top = [w for w, _ in counts.most_common(4)]
        assert top[:3] == s.references
        assert counts[top[2]] > counts[top[3]]


def test_deterministic_for_a_seed(tok):
    for name in ("niah_multikey_2", "vt", "fwe", "niah_single_2"):
        length = LENGTHS.get(name, (1024,))[0]
        a = make_task(tasks=[name], max_seq_length=length, seed=7).samples(tok, MODEL_MAX)
        b = make_task(tasks=[name], max_seq_length=length, seed=7).samples(tok, MODEL_MAX)
        c = make_task(tasks=[name], max_seq_length=length, seed=8).samples(tok, MODEL_MAX)
        assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
        assert [s.prompt for s in a] != [s.prompt for s in c]
        assert len({s.prompt for s in a}) == NUM_SAMPLES


def test_qa_from_fixture(tok):
    task = make_task(tasks=["qa_1", "qa_2"], max_seq_length=2048, qa_dir=str(FIXTURE_QA))
    samples = task.samples(tok, MODEL_MAX)
    squad = json.loads((FIXTURE_QA / "dev-v2.0.json").read_text())
    paragraphs = {qa["question"]: p["context"] for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]}
    qa1 = [s for s in samples if s.subtask == "qa_1"]
    qa2 = [s for s in samples if s.subtask == "qa_2"]
    assert len(qa1) == len(qa2) == NUM_SAMPLES
    for s in qa1:
        question = s.prompt.rsplit("Question: ", 1)[1]
        gold = paragraphs[question]
        assert gold in s.prompt and f"Document {s.meta['gold_documents'][0]}:\n{gold}" in s.prompt
        assert all(r in gold for r in s.references)
        assert s.max_new_tokens == 32 and s.answer_prefix == " Answer:"
        assert total_tokens(tok, s) <= 2048
        assert task.score(s, s.references[-1]) == 100.0 and task.score(s, "nothing") == 0.0
    assert "Who first swam" not in " ".join(s.prompt.rsplit("Question: ", 1)[1] for s in qa1)  # unanswerable
    hotpot = json.loads((FIXTURE_QA / "hotpotqa_dev.json").read_text())
    for s, item in zip(qa2, hotpot):
        assert s.references == [item["answer"]]
        for title, sentences in item["context"]:
            assert f"{title}\n{''.join(sentences)}" in s.prompt


@pytest.mark.skipif(not (REAL_SQUAD / "dev-v2.0.json").is_file(),
                    reason=f"real SQuAD 2.0 dev set not found at {REAL_SQUAD / 'dev-v2.0.json'}")
def test_qa_real_squad(tok):
    task = make_task(tasks=["qa_1"], max_seq_length=4096, qa_dir=str(REAL_SQUAD), num_samples=4)
    samples = task.samples(tok, MODEL_MAX)
    squad = json.loads((REAL_SQUAD / "dev-v2.0.json").read_text())
    answerable = [(qa, p["context"]) for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]
                  if not qa.get("is_impossible")]
    for s, (qa, context) in zip(samples, answerable):
        assert s.prompt.endswith("Question: " + qa["question"])
        assert context in s.prompt
        assert s.references == list(dict.fromkeys(a["text"] for a in qa["answers"]))
        assert s.meta["haystack_units"] > 1
        assert 0.8 * 4096 <= total_tokens(tok, s) <= 4096  # whole documents: a coarser fit than synthetic tasks


def test_cache_reused_and_corrupt_file_regenerated(tok, tmp_path, monkeypatch):
    calls = []
    real = task_module.generate_samples
    monkeypatch.setattr(task_module, "generate_samples", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = dict(tasks=["niah_single_1", "fwe"], max_seq_length=512)
    first = make_task(tmp_path, **cfg).samples(tok, MODEL_MAX)
    assert calls == ["niah_single_1", "fwe"]
    cache = tmp_path / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["files"]) == 2
    entry = next(iter(manifest["files"].values()))
    assert entry["count"] == NUM_SAMPLES and entry["key"]["seed"] == 42 and entry["key"]["generator_version"]

    second = make_task(tmp_path, **cfg).samples(tok, MODEL_MAX)
    assert calls == ["niah_single_1", "fwe"]  # nothing regenerated
    assert [s.to_dict() for s in first] == [s.to_dict() for s in second]
    assert json.loads((cache / "manifest.json").read_text()) == manifest

    target = next(cache.glob("fwe-512-*.jsonl"))
    target.write_text(target.read_text()[:-200])  # truncated (partial write)
    third = make_task(tmp_path, **cfg).samples(tok, MODEL_MAX)
    assert calls == ["niah_single_1", "fwe", "fwe"]
    assert [s.to_dict() for s in third] == [s.to_dict() for s in first]

    make_task(tmp_path, **{**cfg, "seed": 1}).samples(tok, MODEL_MAX)  # another key, another file
    assert len(json.loads((cache / "manifest.json").read_text())["files"]) == 4


def test_length_above_model_max_is_rejected():
    task = make_task(tasks=["niah_single_1"], max_seq_length=[4096, 8192])
    with pytest.raises(ValueError, match=r"max_seq_length=\[8192\].*4096"):
        task.validate(4096)
    task.validate(8192)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="niah_single_9.*valid.*niah_single_1.*qa_2"):
        make_task(tasks=["niah_single_9"])


def test_too_short_target_is_explained(tok):
    with pytest.raises(ValueError, match="cwe: max_seq_length=256 is too short"):
        make_task(tasks=["cwe"], max_seq_length=256).samples(tok, MODEL_MAX)


def test_qa_without_source_skipped_or_rejected(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    task = make_task(tasks=["niah_single_1", "qa_1", "qa_2"], qa_dir=str(empty))
    with caplog.at_level("WARNING"):
        assert task.tasks() == ["niah_single_1"]
    assert "qa_1" in caplog.text and "qa_2" in caplog.text and "task.qa_dir" in caplog.text
    assert make_task(qa_dir=str(empty)).tasks() == SYNTHETIC
    with pytest.raises(ValueError, match=r"\['qa_1'\].*task.qa_dir"):
        make_task(tasks=["qa_1"], qa_dir=str(empty)).validate(MODEL_MAX)


def test_metrics_match_ruler():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert string_match_all("ABC", ["abc"]) == 100.0
    assert string_match_part("It is Paris.", ["London", "paris"]) == 100.0
    assert string_match_part("It is Rome.", ["London", "Paris"]) == 0.0


def test_aggregate_means_per_task_then_over_tasks():
    task = make_task()
    records = [{"id": f"{t}/{n}/{i}", "subtask": t, "score": s, "meta": {"length": n}}
               for t, n, s_list in (("vt", 4096, [100, 50]), ("cwe", 4096, [0]), ("vt", 8192, [0, 0]),
                                    ("cwe", 8192, [100]))
               for i, s in enumerate(s_list)]
    out = task.aggregate(records)
    assert out["by_length"]["4096"]["score"] == pytest.approx((75 + 0) / 2)
    assert out["by_length"]["8192"]["score"] == pytest.approx(50)
    assert out["score"] == pytest.approx((37.5 + 50) / 2)
    assert out["subtasks"]["vt"] == {"score": pytest.approx(37.5), "n": 4}


def test_protocol_names_what_defines_prompts():
    proto = make_task(tasks=["vt", "cwe"], max_seq_length=[8192, 4096]).protocol()
    assert proto["tasks"] == ["vt", "cwe"] and proto["max_seq_length"] == [4096, 8192]
    assert proto["max_new_tokens"]["niah_single_1"] == 128 and proto["metrics"]["qa_1"] == "string_match_part"
    assert json.dumps(proto)


def test_max_new_tokens_for_every_task(tok):
    task = make_task(tasks=["niah_single_1", "vt"], max_seq_length=[1024], max_new_tokens=64)
    samples = task.samples(tok, MODEL_MAX)
    assert {s.max_new_tokens for s in samples} == {64}
    assert task.protocol()["max_new_tokens"]["vt"] == 64
    default = make_task(tasks=["niah_single_1", "vt"], max_seq_length=[1024])
    assert default.protocol()["max_new_tokens"]["vt"] == 30 and default.protocol()["max_new_tokens"]["niah_single_1"] \
        == 128
    for s in samples:
        assert 0.9 * 1024 <= total_tokens(tok, s) <= 1024
    with pytest.raises(ValueError, match="task.max_new_tokens=0 is not valid"):
        make_task(max_new_tokens=0)


@pytest.mark.parametrize("model,rules", [
    ("llama3.1-8b-instruct", ("llama3", "true")),
    ("mistral-7b-instruct-v0.2", ("raw", "true")),
    ("longchat-7b-v1.5-32k", ("vicuna", "true")),
])
def test_samples_are_sized_in_the_model_s_prompt_format(tmp_path, model, rules):
    """Under the paper protocol the prompts are built in the model's format (official RULER templates, BOS), and the
    haystack is sized so that those prompts fit each length; the cache keeps the formats apart."""
    from evals.prompting import PromptFormat
    from standin_tokenizers import byte_ids, standin_tokenizer

    stand_in = standin_tokenizer(model)
    fmt = PromptFormat(*rules)
    task = make_task(tmp_path, tasks=["niah_single_1"], max_seq_length=[2048])
    task.prompt_format = fmt
    samples = task.samples(stand_in, MODEL_MAX)
    bos = stand_in.bos_token_id
    for s in samples:
        ids = prompt_token_ids(stand_in, s, model_chat=True, model_max_len=MODEL_MAX, fmt=fmt)
        assert 0.9 * 2048 <= len(ids) + s.max_new_tokens <= 2048
        text = s.prompt
        if rules[0] == "llama3":
            sh, eh, eot = (stand_in.convert_tokens_to_ids(t) for t in
                           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
            expected = [bos, bos, sh] + byte_ids(stand_in, "user") + [eh] + byte_ids(stand_in, "\n\n" + text) \
                + [eot, sh] + byte_ids(stand_in, "assistant") + [eh] + byte_ids(stand_in, "\n\n" + s.answer_prefix)
        elif rules[0] == "vicuna":
            expected = [bos] + byte_ids(stand_in, "A chat between a curious user and an artificial intelligence "
                                        "assistant. The assistant gives helpful, detailed, and polite answers to the "
                                        f"user's questions. USER: {text} ASSISTANT:{s.answer_prefix}")
        else:
            expected = [bos] + byte_ids(stand_in, text + s.answer_prefix)
        assert ids == expected
    plain = make_task(tmp_path, tasks=["niah_single_1"], max_seq_length=[2048])
    assert plain.cache_key("niah_single_1", 2048, "fp") != task.cache_key("niah_single_1", 2048, "fp")
