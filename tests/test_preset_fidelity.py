"""Two more items of the paper preset: the length cap of the budget plans (the official ``model_max_len``), and
special tokens kept in the decoded answers (the official ``tokenizer.decode`` does not skip them)."""
import pytest
import torch

from conftest import REPO
from evals.longbench.task import LongBenchTask
from rocketkv import compress
from rocketkv.harness.generation import decode, prefill
from rocketkv.harness.models import ModelSpec, build_tiny_random

LLAMA, MISTRAL, LONGCHAT = "llama3.1-8b-instruct", "mistral-7b-instruct-v0.2", "longchat-7b-v1.5-32k"


@pytest.mark.parametrize("model,task,cap", [
    (LLAMA, "ruler", 128000), (LLAMA, "needle", 128000), (LLAMA, "longbench", 127500),
    (MISTRAL, "ruler", 32000), (MISTRAL, "needle", 32000), (MISTRAL, "longbench", 31500),
    (LONGCHAT, "ruler", 32000), (LONGCHAT, "needle", 32000), (LONGCHAT, "longbench", 31500),
])
def test_the_preset_caps_plans_at_the_official_model_max_len(compose_cfg, model, task, cap):
    cfg = compose_cfg(f"model={model}", f"task={task}", "+experiment=paper_protocol", "haystack_file=x")
    spec = ModelSpec.from_cfg(dict(cfg.model))
    assert spec.plan_max_len == cap and spec.special_tokens == "keep"
    plain = ModelSpec.from_cfg(dict(compose_cfg(f"model={model}", f"task={task}").model))
    assert plain.plan_max_len == plain.max_len and plain.special_tokens == "skip"


def test_plan_len_cap_is_checked():
    with pytest.raises(ValueError, match=r"model.plan_len_cap=200000 is not valid.*model.max_len=131072"):
        ModelSpec(name="m", source="hub", max_len=131072, plan_len_cap=200000)
    with pytest.raises(ValueError, match="model.special_tokens='drop' is not valid; use skip or keep"):
        ModelSpec(name="m", source="hub", max_len=1000, special_tokens="drop")


def test_kept_special_tokens_reach_the_answer_text():
    model, tok = build_tiny_random()
    pad = tok.convert_tokens_to_ids("<pad>")
    texts = {}
    for rule in ("skip", "keep"):
        with compress(model, "full", max_new_tokens=1) as session:
            cache = session.new_cache(1)
            prefill(model, [[10, 11, 12, 13]], cache, True)
            logits = torch.zeros(1, model.config.vocab_size)
            logits[0, pad] = 1.0  # the model "generates" a special token that is not EOS
            texts[rule] = decode(model, tok, logits, cache, 1, special_tokens=rule).texts[0]
    assert texts == {"skip": "", "keep": "<pad>"}


# LongBench subsets whose metric a special token in the answer moves (measured on the fixture: each sample's own
# reference as the answer, then with " </s>" after it): the word-overlap and code-similarity metrics.  Only the
# class name (trec), number (passage_count) and paragraph-number (passage_retrieval_en) metrics stay put.
MOVED = {"2wikimqa", "gov_report", "hotpotqa", "lcc", "multi_news", "multifieldqa_en", "musique", "narrativeqa",
         "qasper", "qmsum", "repobench-p", "samsum", "triviaqa"}


def test_which_longbench_metrics_a_special_token_moves(tmp_path):
    from omegaconf import OmegaConf

    from rocketkv.harness.models import tiny_tokenizer

    cfg = OmegaConf.load(REPO / "conf" / "task" / "longbench.yaml")
    cfg.data_dir, cfg.cache_dir = str(REPO / "tests" / "fixtures" / "longbench"), str(tmp_path)
    task = LongBenchTask(cfg)
    moved = set()
    for sample in task.samples(tiny_tokenizer(), 8192):
        answer = sample.references[0]
        if task.score(sample, answer + " </s>") != task.score(sample, answer):
            moved.add(sample.subtask)
    assert moved == MOVED
