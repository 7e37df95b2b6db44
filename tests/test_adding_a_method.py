"""The worked example of docs/adding-a-method.md, read from the file and registered for real: it must keep what it
says, decode exactly over what it keeps, and equal stock generation when the budget covers the prompt."""
import re
import types

import pytest
import torch

from conftest import REPO, peaky_model, stored
from rocketkv.core import METHODS, compress, make_method
from test_cache import PROMPT_LEN, assert_equals_masked_full_attention, prompt, run


@pytest.fixture(scope="module")
def sinks_method():
    text = (REPO / "docs" / "adding-a-method.md").read_text()
    code = re.search(r"```python\n(\"\"\"Attention sinks.*?)```", text, re.S).group(1)
    module = types.ModuleType("doc_sinks")
    exec(compile(code, "docs/adding-a-method.md", "exec"), module.__dict__)
    yield "sinks"
    METHODS.pop("sinks", None)


def test_the_example_keeps_sinks_and_the_recent_window_and_decodes_exactly(sinks_method):
    model = peaky_model()
    ids = prompt(seed=7)
    session, cache, tokens, logits = run(model, sinks_method, 24, max_new=6, ids=ids, sinks=4)
    split = PROMPT_LEN - 1  # eviction runs over prompt[:-1]; the last prompt token is the first decode step
    kept = list(range(4)) + list(range(split - 20, PROMPT_LEN + 6 - 1))
    for layer in cache.layers:
        assert stored(layer, "positions")[0].tolist() == [kept] * layer.positions.shape[1]
    assert session.stats()["kept_tokens"] == 24
    assert_equals_masked_full_attention(model, ids, cache, tokens, logits)


def test_the_example_at_a_covering_budget_equals_stock_generate(sinks_method):
    model = peaky_model()
    ids = prompt(seed=3)
    stock = model.generate(ids, max_new_tokens=8, do_sample=False)
    with compress(model, sinks_method, budget=PROMPT_LEN, max_new_tokens=8) as session:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert session.plan["dense"] and out.tolist() == stock.tolist()
    with pytest.raises(ValueError, match="budget=16 must exceed sinks=16; use budget >= 17"):
        make_method(sinks_method, 16, sinks=16).plan(PROMPT_LEN, 8, 32)
