"""Cells decoded as the rows of one batch (``grid.batch_decode``) against each cell decoded alone."""
import pytest
import torch

from conftest import greedy_steps, peaky_model
from rocketkv.cache import RowStackLayer
from rocketkv.methods import make_method
from rocketkv.row_decode import decode_rows, stack_rows
from rocketkv.session import CompressionSession, compress
from test_generation_equivalence import MAX_NEW, SMALL, prompt, shared_prefill


class DigitTokenizer:
    """Enough of a tokenizer for ``GreedyStream``: token ids as text."""

    eos_token_id = None

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(map(str, tokens))


def forks(model, shared, cells):
    sessions = [CompressionSession(model, make_method(m, budget=b, **o), MAX_NEW, None) for m, b, o in cells]
    return sessions, [s.fork(shared, MAX_NEW) for s in sessions]


def alone(model, shared, ids, cell):
    """One cell forked and decoded on its own: tokens and the logits of every step."""
    (session,), (cache,) = forks(model, shared, [cell])
    with compress(model, "full", None, max_new_tokens=MAX_NEW), torch.no_grad():
        first = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
        tokens, logits = greedy_steps(model, cache, first, MAX_NEW, feed_last=False)
    return tokens[0].tolist(), logits[0], session.stats()


def test_rows_decode_as_each_cell_alone():
    model = peaky_model("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(seed=8)
    shared = shared_prefill(model, ids, capture_window=32)
    sessions, caches = forks(model, shared, SMALL)
    with compress(model, "full", None, max_new_tokens=MAX_NEW):
        streams, t_first, t_decode = decode_rows(model, DigitTokenizer(), caches, int(ids[0, -1]), MAX_NEW, None,
                                                 ignore_eos=True, tie_margin=0.01)
    assert t_first > 0 and t_decode > 0
    outputs = {}
    assert sum(s is None for s in streams) <= 2  # rows at a near tie are left to the exact path
    for cell, session, stream in zip(SMALL, sessions, streams):
        if stream is None:
            continue
        tokens, _, stats = alone(model, shared, ids, cell)
        assert stream.tokens == tokens, cell
        assert session.stats()["kept_tokens"] == stats["kept_tokens"]
        assert session.stats()["decode_steps"] == stats["decode_steps"] == MAX_NEW
        outputs[cell[0], cell[1]] = tuple(tokens)
    assert len(set(outputs.values())) > 2  # the cells really decode differently


def test_one_batched_step_matches_each_cache_alone():
    model = peaky_model("llama")
    ids = prompt(seed=9)
    shared = shared_prefill(model, ids, capture_window=32)
    _, caches = forks(model, shared, SMALL)
    with compress(model, "full", None, max_new_tokens=MAX_NEW), torch.no_grad():
        batch = model(input_ids=ids[:, -1:].expand(len(caches), 1), past_key_values=stack_rows(caches),
                      use_cache=True).logits[:, -1]
    for row, cell in enumerate(SMALL):
        _, logits, _ = alone(model, shared, ids, cell)
        torch.testing.assert_close(batch[row], logits[0], atol=1e-4, rtol=1e-4)


def test_rows_at_a_near_tie_are_left_to_the_exact_path():
    model = peaky_model("llama")
    ids = prompt(seed=8)
    shared = shared_prefill(model, ids, capture_window=32)
    _, caches = forks(model, shared, SMALL[:3])
    with compress(model, "full", None, max_new_tokens=MAX_NEW):
        streams, _, _ = decode_rows(model, DigitTokenizer(), caches, int(ids[0, -1]), MAX_NEW, None,
                                    ignore_eos=True, tie_margin=float("inf"))
    assert streams == [None, None, None]


def test_row_stack_refuses_a_batch_of_the_wrong_size():
    model = peaky_model("llama")
    shared = shared_prefill(model, prompt(seed=8), capture_window=32)
    _, caches = forks(model, shared, SMALL[:2])
    layer = stack_rows(caches).layers[0]
    assert isinstance(layer, RowStackLayer)
    with pytest.raises(ValueError, match="3 rows.*2 rows"):
        layer.update(torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8))
