"""Cells decoded by verifying drafts (``grid.speculative``) against each cell decoded alone, and the draft
and acceptance rules on known cases."""
import pytest
import torch

from conftest import peaky_model
from rocketkv.draft_verify import Lookup, _accept, draft, verify_rows
from rocketkv.generation import GreedyStream
from rocketkv.row_decode import stack_rows
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
    assert draft([3, 16], [], lookup, 4) == []  # one matching token (16) is not enough to draft from


def test_draft_looks_up_the_other_decodes_between_the_output_and_the_prompt():
    lookup = Lookup([10, 11, 12, 13, 14, 11, 12, 15, 16])
    others = [[1, 77, 8, 9, 77, 5, 6], [77, 40], [11, 12, 50, 51]]  # none starts with the outputs below
    # one token (77) suffices in a decode: after its latest occurrence in the first decode that holds it
    assert draft([3, 77], others, lookup, 4) == [5, 6]
    assert draft([4, 11, 12], others, lookup, 4) == [50, 51]  # a decode's (11, 12) before the prompt's
    assert draft([2, 9, 77], others, lookup, 4) == [5, 6]  # (9, 77) in a decode
    # a longer tail in the prompt before a single token in a decode
    assert draft([4, 13, 14], others + [[14, 60]], lookup, 4) == [11, 12, 15, 16]
    assert draft([11, 12, 7, 11, 12], others, lookup, 2) == [7, 11]  # the output's own (11, 12) first
    assert draft([3, 78], [[5, 78]], Lookup([1, 2, 3]), 4) == []  # nothing follows a decode's last token


def test_prompt_lookup_length():
    lookup = Lookup(list(range(10, 40)) + [10, 11])
    assert draft([], [], lookup, 20) == [12, 13, 14, 15]  # a wide batch's lookups stay short
    assert draft([], [], lookup, 20, lookup_len=16) == list(range(12, 28))  # a narrow batch takes more
    assert draft([], [], lookup, 3, lookup_len=16) == [12, 13, 14]  # never past the room left


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
        # the first forward packs every row's MAX_NEW tokens; the rows that agreed with full KV are gone after it
        assert agree and forwards[0] == (1, len(cells) * MAX_NEW) and forwards[1][1] <= (len(cells) - agree) * MAX_NEW


def test_a_cell_alone_verifies_its_own_prompt_lookups():
    """Full KV in a speculative grid: one row, no other decode to draft from, long prompt lookups only (a row
    alone is cheap to widen); its tokens and steps are full KV's decoded step by step."""
    model = peaky_model("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(seed=3)
    ids[0, -12:] = ids[0, 20:32]  # the prompt ends repeating itself, as a needle's question repeats its key
    shared = shared_prefill(model, ids, capture_window=32)
    full_tokens, _, _ = alone(model, shared, ids, SMALL[0])
    (session,), (cache,) = forks(model, shared, SMALL[:1])
    forwards = []
    forward = model.forward
    model.forward = lambda *a, **k: forwards.append(k["input_ids"].shape) or forward(*a, **k)
    try:
        with compress(model, "full", None, max_new_tokens=MAX_NEW):
            [row], _ = verify_rows(model, DigitTokenizer(), [cache], ids[0].tolist(), [], MAX_NEW, None,
                                   ignore_eos=True, tie_margin=0.01)
    finally:
        del model.forward
    assert row is not None and row.tokens == full_tokens
    assert session.stats()["decode_steps"] == MAX_NEW
    assert forwards[0][1] > 4 and len(forwards) <= MAX_NEW  # the prompt's repeat drafted a long first feed


def test_packed_rows_attend_as_if_each_were_fed_alone():
    """Rows fed different numbers of tokens are packed into one sequence: each row's tokens attend as if that row
    were fed alone, and each row holds the costs of its own tokens only."""
    model = peaky_model("llama")
    ids = prompt(seed=5)
    shared = shared_prefill(model, ids, capture_window=32)
    cells = [("quest", 32, {}), ("sparq", 32, {})]
    (s_wide, s_narrow), caches = forks(model, shared, cells)
    alone_sessions, alone_caches = forks(model, shared, cells)
    for s in (s_wide, s_narrow):
        s.state.hold_costs()
    wide = ids[0, -3:].tolist()
    captured = []
    attention = model.model.layers[1].self_attn.o_proj
    hook = attention.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        with compress(model, "full", None, max_new_tokens=MAX_NEW), torch.no_grad():
            seen = caches[0].layers[0].seen
            model(input_ids=torch.tensor([wide + wide[:1]]), position_ids=torch.tensor([[seen, seen + 1, seen + 2, seen]]),
                  past_key_values=stack_rows(caches, widths=[3, 1]), use_cache=True)
            for feed, cache in ((wide, alone_caches[0]), (wide[:1], alone_caches[1])):
                model(input_ids=torch.tensor([feed]), past_key_values=cache, use_cache=True)
    finally:
        hook.remove()
    packed, wide_alone, narrow_alone = captured
    assert packed.shape[:2] == (1, 4)
    assert torch.allclose(packed[0, :3], wide_alone[0], atol=1e-5)
    assert torch.allclose(packed[0, 3], narrow_alone[0, 0], atol=1e-5)
    assert [len(a) for a, _ in s_wide.state.held] == [3] * len(s_wide.state.held)
    assert [len(a) for a, _ in s_narrow.state.held] == [1] * len(s_narrow.state.held)
    assert [layer.stored for layer in caches[0].layers] == [layer.stored for layer in alone_caches[0].layers]
    with pytest.raises(ValueError, match="packed rows"):
        stack_rows(caches, widths=[2, 1]).layers[0].update(torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16))
