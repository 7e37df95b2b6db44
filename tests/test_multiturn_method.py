"""RocketKV-MT and conversations on the core: a cache carried over turns (``CompressionSession.next_turn``).

RocketKV-MT keeps the whole history beside its working set and selects the working set afresh from the whole
history at every turn's prefill; one-shot methods keep what they kept at the first prefill and decode a later
turn's tokens one step at a time.  Checked here: a conversation under full KV (and under RocketKV-MT at a budget
that covers it, run through its own sparse code) gives stock transformers' greedy tokens turn for turn; the
selection at turn 2 equals a plain float64 SnapKV over the whole history; a replayed decode step of a later turn
equals the eager one.
"""
import pytest
import torch
from transformers.cache_utils import DynamicCache

from conftest import peaky_model, stored
from test_decode_step import FrozenHostReplay
from test_methods_reference import _gen, check_topk_set, make_layer, ref_maxpool, ref_window_scores
from rocketkv.core import compress
from rocketkv.core.graphs import DecodeStep
from rocketkv.core.methods import make_method
from rocketkv.core.session import cache_kwarg
from rocketkv.harness.generation import prefill

NEW = 8


def conversation(seed=0, lengths=(120, 20, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]


def stock_conversation(model, turns, new=NEW):
    """Stock transformers: one DynamicCache over the turns; each turn is fed after the previous answer."""
    cache, out, pending = DynamicCache(), [], []
    with torch.no_grad():
        for ids in turns:
            logits = model(input_ids=torch.tensor([pending + ids]), past_key_values=cache, use_cache=True).logits[:, -1]
            tokens = []
            for i in range(new):
                tokens.append(logits.argmax(-1))
                if i + 1 < new:
                    logits = model(input_ids=tokens[-1][:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            out.append([int(t) for t in tokens])
            pending = out[-1][-1:]  # the answer's last token is fed with the next turn
    return out


def compressed_conversation(model, method, budget, turns, new=NEW, sparse=False, step_class=DecodeStep, **opts):
    """The same conversation through ``compress``: prefill of each turn (its last token as the first decode step),
    greedy steps, ``next_turn`` between turns.  ``sparse`` runs the method's own code even when its plan is dense."""
    out, pending = [], []
    with compress(model, method, budget, max_new_tokens=new, **opts) as session:
        plan = session.plan_for(sum(map(len, turns)) + (len(turns) - 1) * new, new)
        if sparse:
            plan = {**plan, "dense": False}
        cache = session.new_cache(new, prompt_len=len(turns[0]), plan=plan)
        for i, ids in enumerate(turns):
            feed = pending + ids
            if i:
                session.next_turn(cache, len(feed), new)
            logits, _ = prefill(model, [feed], cache, split_last=True)
            step = step_class(model, cache, cache_kwarg(model))
            tokens = [logits.argmax(-1)]
            for _ in range(new - 1):
                tokens.append(step(tokens[-1]).clone())
            out.append([int(t) for t in tokens])
            pending = out[-1][-1:]
        layers = cache.layers
        stats = session.release()
    return out, layers, stats


def test_full_kv_conversation_equals_stock_generate():
    model = peaky_model()
    turns = conversation()
    ref = stock_conversation(model, turns)
    assert len({t for turn in ref for t in turn}) > 8  # the model is not degenerate
    tokens, layers, stats = compressed_conversation(model, "full", None, turns)
    assert tokens == ref
    assert layers[0].seen == sum(map(len, turns)) + 3 * NEW - 1 and layers[0].stored == layers[0].seen
    # per turn its last token and NEW - 1 fed tokens; a later turn's other tokens (the answer's last one and all
    # but its own last) are decoded one step each
    assert stats["decode_steps"] == 3 * NEW + 20 + 9


@pytest.mark.parametrize("sparse,skip", [(False, 0), (True, 0), (True, 1)])
def test_rocketkv_mt_covering_the_conversation_equals_full_kv(sparse, skip):
    """At a budget covering the whole conversation RocketKV-MT is exact: with its dense plan it runs as full KV;
    forced through its own code (history kept, stage 1 over the history keeping everything, stage 2's top-k over
    every slot) it still gives the stock tokens of all three turns, also when a dense first layer decodes a turn's
tokens one step each while the others prefill it."""
    model = peaky_model()
    turns = conversation(1)
    ref = stock_conversation(model, turns)
    tokens, layers, _ = compressed_conversation(model, "rocketkv_mt", 1024, turns, sparse=sparse, skip_layers=skip)
    assert tokens == ref
    assert [layer.history_keys is not None for layer in layers] == [sparse and i >= skip for i in range(len(layers))]


@pytest.mark.parametrize("method,opts", [("topk", {}), ("quest", {}), ("sparq", {}), ("rocketkv", {}),
                                         ("snapkv", {"selection": "group"})])
def test_one_shot_methods_covering_the_conversation_equal_full_kv(method, opts):
    """A one-shot method decodes a later turn's tokens one step each with its own decode (its buffers and metadata
    grown by ``next_turn``); at a budget covering the conversation, forced through its own code, that is exact."""
    model = peaky_model()
    turns = conversation(5)
    tokens, layers, _ = compressed_conversation(model, method, 1024, turns, sparse=True, **opts)
    assert tokens == stock_conversation(model, turns)
    assert layers[0].history_keys is None and layers[0].compressed


def test_rocketkv_mt_three_turns_at_a_small_budget():
    model = peaky_model()
    turns = conversation(2)
    mt, layers, stats = compressed_conversation(model, "rocketkv_mt", 32, turns)
    plain, plain_layers, _ = compressed_conversation(model, "rocketkv", 32, turns)
    assert [len(t) for t in mt] == [NEW] * 3
    assert mt[0] == plain[0]  # the first turn is RocketKV on one prompt
    seen = sum(map(len, turns)) + 3 * NEW - 1
    layer = layers[-1]
    assert layer.seen == seen and layer.history_keys.shape[2] >= seen
    # the working set: RocketKV's prompt budget selected from the whole history, plus the turn's decode steps
    assert layer.stored == layer.state.plan["prompt_budget"] + NEW
    positions = stored(layer, "positions")
    assert positions.max() == seen - 1 and (positions.diff(dim=-1) > 0).all()
    # the history holds every token's K/V; the working set's rows are the history's rows at their positions
    rows = layer.history_keys[:, :, :seen].gather(2, positions[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
    torch.testing.assert_close(stored(layer, "keys"), rows)
    assert stats["stored_kv_bytes"] > plain_layers[0].kv_bytes() * len(layers)  # the history is stored too
    # plain RocketKV evicted once: later turns' tokens were appended to what survived the first prefill
    assert plain_layers[-1].stored == plain_layers[-1].state.plan["prompt_budget"] + seen - (len(turns[0]) - 1)


def test_a_replayed_step_of_a_later_turn_equals_the_eager_one():
    model = peaky_model()
    turns = conversation(3)
    eager = compressed_conversation(model, "rocketkv_mt", 32, turns, step_class=DecodeStep)
    replay = compressed_conversation(model, "rocketkv_mt", 32, turns, step_class=FrozenHostReplay)
    assert replay[0] == eager[0] and replay[2] == eager[2]


@pytest.mark.parametrize("shape", [(1, 2, 4, 32), (2, 3, 1, 16), (2, 2, 2, 12)])
def test_rocketkv_mt_turn_selection_reference(shape):
    """Turn 1 prefill, three decoded tokens, then turn 2 (shorter than the window): the working set after turn 2's
    prefill is SnapKV (group-wise, max-pooled) over the whole history with turn 2's queries as the window, written
    here as a plain float64 loop; the history keeps every token."""
    b, hkv, g, d = shape
    n1, n_dec, n2, window, kernel = 97, 3, 6, 8, 5
    m = make_method("rocketkv_mt", 64, window=window, kernel_size=kernel, kernels="torch")
    layer, K1, V1 = make_layer(m, b, hkv, g, d, n1, seed=g + d, max_new=n_dec)
    plan = layer.state.plan = {**m.plan(n1 + n_dec + n2, n_dec, d, None, g), "prompt_budget": 40, "dense": False}
    scale = d ** -0.5
    q1 = torch.randn(b, hkv, g, n1, d, generator=_gen(1))
    with torch.no_grad():
        m.compress(layer, q1[..., : n1 - 1, :], n1 - 1, plan, scale)  # the prefill of prompt[:-1]
        turn1 = stored(layer, "positions").clone()
        extra_k = torch.randn(b, hkv, n_dec + n2, d, generator=_gen(2))
        extra_v = torch.randn(b, hkv, n_dec + n2, d, generator=_gen(3))
        for i in range(n_dec):
            layer.update(extra_k[:, :, i:i + 1], extra_v[:, :, i:i + 1])
        layer.begin_turn(n2 + 1)
        assert not layer.compressed and layer.stored == n1 + n_dec
        layer.update(extra_k[:, :, n_dec:], extra_v[:, :, n_dec:])  # the turn's tokens, one forward
        q2 = torch.randn(b, hkv, g, n2, d, generator=_gen(4))
        history = n1 + n_dec + n2
        m.compress(layer, q2, history, plan, scale)
    K = torch.cat([K1, extra_k], dim=2).double()
    V = torch.cat([V1, extra_v], dim=2)
    w = min(window, n2)
    q_full = torch.zeros(b, hkv, g, history, d, dtype=torch.float64)
    q_full[..., history - n2:, :] = q2.double()
    torch.testing.assert_close(layer.history_keys[:, :, :history].double(), K)
    reselected = 0
    for bi in range(b):
        for kh in range(hkv):
            pos = stored(layer, "positions")[bi, kh].tolist()
            torch.testing.assert_close(stored(layer, "values")[bi, kh], V[bi, kh, pos])
            scores = sum(ref_window_scores(q_full[bi, kh, h], K[bi, kh], history, w, scale) for h in range(g))
            check_topk_set({p for p in pos if p < history - w}, ref_maxpool(scores, kernel), 40 - w)
            assert [p for p in pos if p >= history - w] == list(range(history - w, history))
            reselected += len(set(pos) - set(turn1[bi, kh].tolist()))
    assert reselected > 0  # turn 2 brought back tokens turn 1 had dropped from the working set


def test_one_shot_method_keeps_its_cache_across_turns():
    m = make_method("rocketkv", 64, window=8, kernels="torch")
    layer, _, _ = make_layer(m, 1, 2, 2, 16, 97, max_new=4)
    layer.state.plan = {**layer.state.plan, "prompt_budget": 40}
    with torch.no_grad():
        m.compress(layer, torch.randn(1, 2, 2, 96, 16), 96, layer.state.plan, 0.25)
        layer.compressed = True
        kept = stored(layer, "positions").clone()
        layer.begin_turn(200)
    assert layer.compressed and layer.history_keys is None and layer.capacity >= layer.stored + 200
    assert torch.equal(stored(layer, "positions"), kept)


def test_rocketkv_mt_on_one_prompt_is_rocketkv():
    model = peaky_model()
    turns = conversation(4, lengths=(150,))
    mt, _, mt_stats = compressed_conversation(model, "rocketkv_mt", 32, turns)
    plain, _, plain_stats = compressed_conversation(model, "rocketkv", 32, turns)
    assert mt == plain
    assert mt_stats["attended_tokens"] == plain_stats["attended_tokens"]
    assert mt_stats["stored_kv_bytes"] > plain_stats["stored_kv_bytes"]  # its history besides
