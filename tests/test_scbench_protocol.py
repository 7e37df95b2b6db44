"""SCBench under the paper protocol: the official RocketKV runs' settings (docs/protocol.md, "SCBench").

The official multi-turn pipeline (NVlabs/RocketKV eval_scbench.py, GreedySearch in eval/scbench_utils) differs
from our default in: the observation window (128), each turn prefilled whole (its last token included), the
budget plan from the first turn plus one answer, the previous answer's last generated token never fed, and the
tokenizer's chat template.  Each is checked here against its documented official value, on the tiny model.
"""
import json
from pathlib import Path

import pytest

from conftest import REPO
from evals.prompting import conversation_token_ids
from evals.scbench.task import SCBenchTask
from rocketkv.core.methods.rocketkv_mt import RocketKVMT
from rocketkv.harness.cells import make_cell, plan_shape
from rocketkv.harness.models import tiny_tokenizer
from rocketkv.harness.runner import run
from standin_tokenizers import standin_tokenizer

FIXTURE = REPO / "tests" / "fixtures" / "scbench"
RUN = ["model=tiny-random", "update_leaderboard=false", "progress=false", "task=scbench", f"task.data_dir={FIXTURE}",
       "task.subsets=[scbench_kv]", "limit=1", "task.max_new_tokens=4", "method=rocketkv_mt", "budget=64"]


def test_the_preset_sets_the_official_scbench_options(compose_cfg):
    official = compose_cfg(*RUN, "+experiment=paper_protocol")
    assert (official.window, official.decode_last_prompt_token) == (128, False)
    assert (official.task.turn_format, official.task.plan_length, official.task.last_answer_token) == \
        ("chat_template", "first_turn", "dropped")
    default = compose_cfg(*RUN)
    assert (default.window, default.decode_last_prompt_token) == (None, None)
    assert (default.task.turn_format, default.task.plan_length, default.task.last_answer_token) == \
        ("raw", "conversation", "fed")
    for cfg, window, split in ((official, 128, False), (default, 32, True)):
        for name in ("rocketkv_mt", "rocketkv", "snapkv"):
            cfg.method.name = name
            method = make_cell(cfg, "tiny-random", None).method
            assert (method.window, method.decode_last_prompt_token) == (window, split)
    cfg = compose_cfg(*RUN, "+experiment=paper_protocol", "method=full")
    assert make_cell(cfg, "tiny-random", None).method.window == 32  # full KV has nothing to select
    # the run-level options reach the method, so its results folder
    hashes = {make_cell(compose_cfg(*RUN, *extra), "tiny-random", None).config_hash
              for extra in ([], ["window=64"], ["decode_last_prompt_token=false"], ["method.window=64"])}
    assert len(hashes) == 3  # window=64 and method.window=64 are the same method
    with pytest.raises(ValueError, match=r"window=0 is not valid; give an integer >= 1"):
        make_cell(compose_cfg(*RUN, "window=0"), "tiny-random", None)


def test_chat_turns_render_as_scbench_does():
    tok = standin_tokenizer("llama3.1-8b-instruct")
    task = SCBenchTask({"data_dir": str(FIXTURE), "subsets": ["scbench_kv"], "turn_format": "chat_template"})
    row = json.loads((FIXTURE / "scbench_kv.jsonl").read_text().splitlines()[0])
    sample = task.samples(tok, 8192)[0]
    first = ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
             f"{row['context']}\n\n{row['multi_turns'][0]['input']}")
    # the first turn: one user message in the chat template, with the generation prompt
    assert sample.prompt + sample.turns[0].prompt == tok.apply_chat_template(
        [{"role": "user", "content": first}], add_generation_prompt=True, tokenize=False)
    assert sample.prompt.endswith(row["context"])
    # a later turn continues the history: the previous gold answer closes the assistant message, then the question
    answer, question = row["multi_turns"][0]["answer"], row["multi_turns"][1]["input"]
    assert sample.turns[1].prompt == (f"{answer}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{question}"
                                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # tokenised as officially: the tokenizer's BOS before the template's (two), the later turns without any
    rows = conversation_token_ids(tok, sample, 8192)
    assert rows[0][:2] == [tok.bos_token_id] * 2 and tok.bos_token_id not in rows[1]
    with pytest.raises(ValueError, match="task.turn_format='chat'"):
        SCBenchTask({"data_dir": str(FIXTURE), "turn_format": "chat"})
    mistral = standin_tokenizer("mistral-7b-instruct-v0.2")
    saved = mistral.chat_template
    mistral.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('roles must alternate') }}" \
                            "{% endif %}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    try:
        with pytest.raises(ValueError, match=r"cannot render SCBench's turns \(roles must alternate\)"):
            task.samples(mistral, 8192)
    finally:
        mistral.chat_template = saved


def test_plan_from_the_first_turn():
    task = SCBenchTask({"data_dir": str(FIXTURE), "subsets": ["scbench_kv"], "plan_length": "first_turn"})
    sample = task.samples(tiny_tokenizer(), 8192)[0]
    rows = conversation_token_ids(tiny_tokenizer(), sample, 8192)
    assert plan_shape(sample, rows) == (len(rows[0]), sample.max_new_tokens)
    whole = SCBenchTask({"data_dir": str(FIXTURE), "subsets": ["scbench_kv"]}).samples(tiny_tokenizer(), 8192)[0]
    assert plan_shape(whole, rows) == (sum(map(len, rows)) + (len(rows) - 1) * whole.max_new_tokens,
                                       whole.max_new_tokens)


@pytest.fixture
def compress_calls(monkeypatch):
    calls = []
    original = RocketKVMT.compress

    def spy(self, layer, q_window, prompt_len, plan, scaling):
        if layer.layer_idx == 0:
            calls.append({"queries": q_window.shape[-2], "prompt_len": prompt_len, "window": self.window})
        return original(self, layer, q_window, prompt_len, plan, scaling)

    monkeypatch.setattr(RocketKVMT, "compress", spy)
    return calls


@pytest.mark.parametrize("official", [False, True])
def test_rocketkv_mt_conversation_under_each_protocol(compose_cfg, tmp_path, compress_calls, official):
    extra = ["+experiment=paper_protocol"] if official else []
    cfg = compose_cfg(*RUN, *extra, f"output_dir={tmp_path}")
    [metrics] = run(cfg)
    record = json.loads(next(Path(metrics["run"]["results_dir"]).glob("predictions.jsonl")).read_text())
    task = SCBenchTask(cfg.task)
    sample = task.samples(tiny_tokenizer(), 8192)[0]
    rows = conversation_token_ids(tiny_tokenizer(), sample, 8192)
    turns = record["turns"]
    assert len(turns) == len(rows) == 2 and len(compress_calls) == 2
    fed_back = [0] + [int(t["new_tokens"] == 4) for t in turns[:-1]]  # an EOS answer leaves nothing to feed
    for i, (turn, call) in enumerate(zip(turns, compress_calls)):
        assert turn["prompt_tokens"] == len(rows[i]) + (0 if official else fed_back[i])
        whole = turn["prompt_tokens"] - (0 if official else 1)  # the turn's tokens prefilled before stage 1
        assert call["queries"] == whole
        assert call["window"] == (128 if official else 32)
    # the plan: from the first turn and one answer (official), else from the whole conversation
    n = len(rows[0]) if official else sum(map(len, rows)) + (len(rows) - 1) * sample.max_new_tokens
    expected = make_cell(cfg, "tiny-random", None).method.plan(n, sample.max_new_tokens, 32, 8192, 4)
    assert record["budget_params"] == expected
    assert metrics["run"]["protocol"].get("plan_length") == ("first_turn" if official else None)
