import pytest

from evals.needle.task import NeedleTask
from rocketkv.harness.models import tiny_tokenizer
from evals.prompting import prompt_token_ids


def make(**over):
    cfg = {"lengths": [400, 800], "depths": [0.0, 0.5, 1.0], "seed": 3, **over}
    return NeedleTask(cfg)


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_holds_needle_and_hits_length(chat):
    tok = tiny_tokenizer()
    task = make(chat_template=chat)
    samples = task.samples(tok, 8192)
    assert len(samples) == 6 and len({s.references[0] for s in samples}) == 6
    for s in samples:
        key = s.references[0]
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.prompt
        ids = prompt_token_ids(tok, s, model_chat=True, model_max_len=8192)
        text = tok.decode(ids)
        assert text.rstrip().endswith("What is the pass key?" + ("\n<s>assistant: The pass key is" if chat
                                                                   else " The pass key is"))
        assert ("user:" in text) == chat
        assert 0.9 * s.meta["length"] <= len(ids) <= s.meta["length"] + 2


def test_needle_depth_places_the_needle():
    tok = tiny_tokenizer()
    first, middle, last = make(lengths=[800]).samples(tok, 8192)
    pos = [s.prompt.index("The pass key is") / len(s.prompt) for s in (first, middle, last)]
    assert pos[0] < 0.15 and 0.4 < pos[1] < 0.6 and pos[2] > 0.85


def test_score_and_protocol():
    task = make()
    [s] = task.samples(tiny_tokenizer(), 8192)[:1]
    key = s.references[0]
    assert task.score(s, f" {key}. Remember it.") == 100.0
    assert task.score(s, f" {key[:-1]}0.") == 0.0
    assert task.protocol()["chat_template"] is False and make(chat_template=True).protocol()["chat_template"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="task.haystack='essays'"):
        make(haystack="essays")
    with pytest.raises(ValueError, match=r"task.depths=\[1.5\]"):
        make(depths=[1.5])


def test_length_that_does_not_fit_the_model_is_rejected():
    with pytest.raises(ValueError, match=r"task.lengths \[8190\] plus 16 new tokens .* 8192; use lengths <= 8176"):
        make(lengths=[4000, 8190]).validate(8192)
    make(lengths=[4000, 8176]).validate(8192)
