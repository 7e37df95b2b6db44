"""Cells decoded by verifying drafts (``grid.speculative``) against each cell decoded alone, and the draft
and acceptance rules on known cases."""
import pytest

from conftest import peaky_model
from rocketkv.draft_verify import Lookup, _accept, draft, verify_rows
from rocketkv.generation import GreedyStream
from rocketkv.session import compress
from test_generation_equivalence import MAX_NEW, SMALL, prompt, shared_prefill
from test_row_decode import DigitTokenizer, alone, forks


def test_draft_takes_the_longest_decode_that_starts_with_the_output():
    lookup = Lookup([5, 6, 7, 8, 9])
    assert draft([1, 2], [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9]], lookup, 3) == [3, 4, 5]
    assert draft([], [[4, 5], [4, 5, 6]], lookup, 8) == [4, 5, 6]
    assert draft([1, 2], [[1, 2, 3]], lookup, 0) == []


def test_draft_falls_back_to_prompt_lookup():
    lookup = Lookup([10, 11, 12, 13, 14, 11, 12, 15, 16])
    assert draft([4, 11, 12], [[9, 9, 9, 9]], lookup, 5) == [15, 16]  # latest (11, 12) in the prompt
    assert draft([11, 12, 7, 11, 12], [], lookup, 2) == [7, 11]  # the output's own earlier (11, 12) first
    assert draft([], [], Lookup([1, 2, 3, 1, 2]), 4) == [3, 1, 2]  # the prompt's own tail, before any output
    assert draft([77], [], lookup, 4) == []  # nothing seen before


def stream(max_new=10):
    return GreedyStream(DigitTokenizer(), max_new, None, eos={99})


@pytest.mark.parametrize("fed,chosen,margins,max_new,expected,tokens", [
    ([1, 5, 6, 7], [5, 6, 8, 3], [1.0] * 4, 10, (3, True), [5, 6, 8]),  # draft kept up to the disagreement
    ([1, 5, 6], [5, 6, 7], [1.0] * 3, 10, (3, True), [5, 6, 7]),  # whole draft kept, plus the next choice
    ([1, 5], [99, 4], [1.0] * 2, 10, (1, False), []),  # EOS ends the row
    ([1, 5, 6], [5, 6, 7], [1.0] * 3, 2, (2, False), [5, 6]),  # max_new_tokens ends the row
    ([1, 5, 6], [5, 6, 7], [1.0, 0.001, 1.0], 10, (None, False), [5]),  # a near tie leaves for the exact path
])
def test_accept(fed, chosen, margins, max_new, expected, tokens):
    s = stream(max_new)
    assert _accept(s, fed, chosen, margins, tie_margin=0.01) == expected
    assert s.tokens == tokens


@pytest.mark.parametrize("drafts", ["full", "garbage"])
def test_verified_rows_decode_as_each_cell_alone(drafts):
    """Every row's tokens, decode steps and cache size equal the cell decoded alone, whether the drafts are
    full KV's tokens or always wrong; a row whose tokens are full KV's finishes in the first forward."""
    model = peaky_model("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(seed=8)
    shared = shared_prefill(model, ids, capture_window=32)
    full_tokens, _, _ = alone(model, shared, ids, SMALL[0])
    known = [full_tokens] if drafts == "full" else [[int(ids[0, 3])] * MAX_NEW]
    cells = SMALL[1:]
    sessions, caches = forks(model, shared, cells)
    forwards = []
    forward = model.forward
    model.forward = lambda *a, **k: forwards.append(k["input_ids"].shape) or forward(*a, **k)
    try:
        with compress(model, "full", None, max_new_tokens=MAX_NEW):
            streams, seconds = verify_rows(model, DigitTokenizer(), caches, ids[0].tolist(), known, MAX_NEW, None,
                                           ignore_eos=True, tie_margin=0.01)
    finally:
        del model.forward
    assert all(s > 0 for s in seconds)
    assert sum(s is None for s in streams) <= 2  # rows at a near tie are left to the exact path
    compared = 0
    for cell, session, row in zip(cells, sessions, streams):
        if row is None:
            continue
        tokens, _, stats = alone(model, shared, ids, cell)
        assert row.tokens == tokens, cell
        got = session.stats()
        for key in ("decode_steps", "kept_tokens", "stored_kv_bytes", "metadata_bytes"):
            assert got[key] == stats[key], (cell, key)
        for key in ("attended_tokens", "elements_read_per_step"):
            assert got[key] == pytest.approx(stats[key], rel=1e-3), (cell, key)
        compared += 1
    assert compared >= len(cells) - 2
    assert any(row is not None and row.tokens != full_tokens for row in streams)  # drafts were rejected
    agree = sum(row is not None and row.tokens == full_tokens for row in streams)
    if drafts == "full":
        assert agree and forwards[0] == (len(cells), MAX_NEW) and forwards[1][0] <= len(cells) - agree
