"""The compressed cache: what is stored after eviction, reported lengths, original positions (RoPE), statistics."""

import pytest
import torch
from transformers import AttentionInterface

from conftest import greedy_steps, peaky_model, prompt_logits, stored
from rocketkv.core.session import compress

PROMPT_LEN, MAX_NEW = 90, 8


def prompt(length=PROMPT_LEN, seed=0):
    return torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def run(model, method, budget, max_new=MAX_NEW, ids=None, **opts):
    """Manual greedy loop inside compress: (session, cache, generated tokens, logits per step)."""
    ids = prompt() if ids is None else ids
    with compress(model, method, budget, max_new_tokens=max_new, **opts) as session:
        cache = session.new_cache()
        tokens, logits = greedy_steps(model, cache, prompt_logits(model, cache, ids), max_new, feed_last=False)
    return session, cache, tokens, logits


# ------------------------------------------------------------------ sizes
def test_rocketkv_cache_shrinks_to_prompt_budget():
    model = peaky_model()
    session, cache, tokens, _ = run(model, "rocketkv", 32)
    plan = session.plan
    P = plan["prompt_budget"]
    assert P < PROMPT_LEN - 1
    cfg = model.config
    d, hkv = cfg.head_dim, cfg.num_key_value_heads
    # P prompt tokens kept from prompt[:-1]; the last prompt token and MAX_NEW - 1 fed tokens appended
    for layer in cache.layers:
        assert layer.stored == P + MAX_NEW
        assert stored(layer, "keys").shape == (1, hkv, P + MAX_NEW, d)
        assert layer.keys.shape[2] == layer.capacity >= P + MAX_NEW  # the buffer, with room for the planned steps
        assert layer.visible is None
        assert layer.get_seq_length() == PROMPT_LEN + MAX_NEW - 1
    assert cache.get_seq_length() == PROMPT_LEN + MAX_NEW - 1
    stats = session.stats()
    assert stats["kept_tokens"] == P
    assert stats["stored_kv_bytes"] == cfg.num_hidden_layers * 2 * hkv * (P + MAX_NEW) * d * 4


def test_snapkv_group_cache_shrinks():
    model = peaky_model()
    session, cache, _, _ = run(model, "snapkv", 48, selection="group")
    for layer in cache.layers:
        assert layer.stored == 48 + MAX_NEW
    assert session.stats()["kept_tokens"] == 48


def test_snapkv_head_cache_keeps_union_with_per_head_visibility():
    model = peaky_model()
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    session, cache, _, _ = run(model, "snapkv", 40 * g, selection="head")
    for layer in cache.layers:
        vis = stored(layer, "visible")  # [1, Hkv, g, S]
        assert vis.shape[:3] == (1, model.config.num_key_value_heads, g) and vis.shape[-1] == layer.stored
        in_prompt = stored(layer, "positions") < PROMPT_LEN - 1
        per_head = (vis & in_prompt.unsqueeze(2)).sum(-1)
        assert (per_head == 40).all()  # each query head sees exactly t/g prompt tokens (window included)
        assert layer.stored <= 40 * g + MAX_NEW


@pytest.mark.parametrize("method,budget,opts", [("rocketkv", 32, {}), ("snapkv", 48, {"selection": "group"}),
                                                ("snapkv", 160, {"selection": "head"})])
def test_positions_are_original_positions(method, budget, opts):
    model = peaky_model()
    _, cache, _, _ = run(model, method, budget, **opts)
    split = PROMPT_LEN - 1
    for layer in cache.layers:
        for kh in range(layer.positions.shape[1]):
            pos = stored(layer, "positions")[0, kh]
            if layer.visible is not None:
                pos = pos[stored(layer, "visible")[0, kh].any(0)]
            pos = pos.tolist()
            assert all(a < b for a, b in zip(pos, pos[1:]))  # strictly increasing
            prompt_part = [p for p in pos if p < split]
            assert set(prompt_part) <= set(range(split)) and len(prompt_part) < split
            assert pos[len(prompt_part):] == list(range(split, PROMPT_LEN + MAX_NEW - 1))


def test_skip_layers_are_dense():
    model = peaky_model()
    session, cache, _, _ = run(model, "rocketkv", 32, skip_layers=2)
    P = session.plan["prompt_budget"]
    assert [l.stored for l in cache.layers] == [PROMPT_LEN + MAX_NEW - 1] * 2 + [P + MAX_NEW] * 2


# ------------------------------------------------------------------ positions of RoPE
def test_large_budget_same_logits_as_uncompressed():
    model = peaky_model()
    _, _, tokens_full, logits_full = run(model, "full", None)
    for method, budget, opts in [("rocketkv", 1024, {}), ("snapkv", 1024, {"selection": "group"})]:
        _, cache, tokens, logits = run(model, method, budget, **opts)
        assert cache.layers[0].stored == PROMPT_LEN + MAX_NEW - 1
        assert tokens.tolist() == tokens_full.tolist()
        torch.testing.assert_close(logits, logits_full, atol=1e-4, rtol=1e-4)


_REF = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Dense attention over the whole sequence; queries from position ``split`` on see only the slots the
    compressed cache of that layer kept (``_REF['allowed'][layer] : [B, Hq, L]``)."""
    b, hq, n, d = query.shape
    g = hq // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    mask = torch.ones(n, n, dtype=torch.bool).tril().expand(b, hq, n, n).clone()
    allowed = _REF["allowed"][module.layer_idx]
    split = _REF["split"]
    mask[:, :, split:, :] &= allowed[:, :, None, :n]
    w = torch.softmax((query @ k.transpose(-1, -2) * scaling).masked_fill(~mask, float("-inf")), -1)
    return (w @ v).transpose(1, 2).contiguous(), None


AttentionInterface.register("rocketkv_test_masked_ref", _masked_reference_attention)


@pytest.mark.parametrize("method,budget,opts", [("snapkv", 48, {"selection": "group"}),
                                                ("snapkv", 160, {"selection": "head"}),
                                                ("rocketkv", 32, {})])
def test_eviction_equals_masked_full_attention(monkeypatch, method, budget, opts):
    """After eviction, decoding equals a full-sequence forward in which the decode queries may only attend to the
    kept positions.  Any renumbering of positions after eviction (RoPE of new tokens at ``stored`` instead of
    ``seen``) or misalignment of stored keys with positions breaks this.

    RocketKV's stage 2 is sparse whenever stage 1 evicts (C > t/2 always), so for this test its plan's k is raised
    above the cache size: stage 1 (eviction, positions) runs for real, stage 2 becomes exact attention.
    """
    if method == "rocketkv":
        import rocketkv.core.methods.rocketkv as rk

        real_budget = rk.rocketkv_budget
        monkeypatch.setattr(rk, "rocketkv_budget", lambda *a, **k: {**real_budget(*a, **k), "topk": 10 ** 6})
    model = peaky_model()
    ids = prompt(seed=7)
    _, cache, tokens, logits = run(model, method, budget, max_new=6, ids=ids, **opts)
    assert cache.layers[0].stored < PROMPT_LEN + 6 - 1  # eviction happened
    assert_equals_masked_full_attention(model, ids, cache, tokens, logits)


def assert_equals_masked_full_attention(model, ids, cache, tokens, logits):
    """The decode's logits equal those of one full forward over prompt + tokens in which each decode query of a
    head sees only the positions that head's compressed cache kept."""
    split = ids.shape[1] - 1
    total = split + tokens.shape[1]
    allowed = {}
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in cache.layers:
        a = torch.zeros(1, model.config.num_attention_heads, total, dtype=torch.bool)
        for kh in range(layer.positions.shape[1]):
            for h in range(g):
                pos = stored(layer, "positions")[0, kh]
                if layer.visible is not None:
                    pos = pos[stored(layer, "visible")[0, kh, h]]
                a[0, kh * g + h, pos] = True
        allowed[layer.layer_idx] = a
    _REF.update(allowed=allowed, split=split)
    full_ids = torch.cat([ids, tokens[:, :-1]], dim=1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("rocketkv_test_masked_ref")
    try:
        with torch.no_grad():
            ref_logits = model(input_ids=full_ids, use_cache=False).logits[:, split:]
    finally:
        model.set_attn_implementation(previous)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ statistics
STAT_KEYS = {"kept_tokens", "attended_tokens", "elements_read_per_step", "bytes_read_per_step", "stored_kv_bytes",
             "metadata_bytes", "decode_steps"}


def test_stats_sane_for_small_budget():
    model = peaky_model()
    full, _, _, _ = run(model, "full", None)
    fs = full.stats()
    assert set(fs) >= STAT_KEYS
    assert fs["decode_steps"] == MAX_NEW
    assert fs["kept_tokens"] == PROMPT_LEN - 1
    # full attends to everything stored: mean over the steps of (PROMPT_LEN + i), i = 0..MAX_NEW-1
    assert fs["attended_tokens"] == pytest.approx(PROMPT_LEN + (MAX_NEW - 1) / 2)
    assert fs["metadata_bytes"] == 0
    budget = 32
    for method, opts, k in [("topk", {}, budget), ("quest", {}, budget // 2), ("sparq", {}, budget // 2),
                            ("rocketkv", {}, budget // 2), ("snapkv", {"selection": "group"}, None)]:
        b = 48 if method == "snapkv" else budget
        session, cache, _, _ = run(model, method, b, **opts)
        st = session.stats()
        assert set(st) >= STAT_KEYS, method
        assert st["decode_steps"] == MAX_NEW, method
        assert 0 < st["attended_tokens"], method
        if k is not None:
            assert st["attended_tokens"] <= k, (method, st)
        assert st["bytes_read_per_step"] < fs["bytes_read_per_step"], (method, st, fs)
        assert st["bytes_read_per_step"] == pytest.approx(st["elements_read_per_step"] * 4)
        if method in ("quest", "rocketkv"):
            assert st["metadata_bytes"] > 0
        if method in ("rocketkv", "snapkv"):
            assert st["stored_kv_bytes"] < fs["stored_kv_bytes"]
            assert st["kept_tokens"] < PROMPT_LEN - 1
        else:
            assert st["stored_kv_bytes"] == fs["stored_kv_bytes"]


def test_stats_before_any_generation_is_empty():
    model = peaky_model()
    with compress(model, "rocketkv", 256) as session:
        assert session.stats() == {} and session.plan is None


def test_beam_search_and_cropping_refused():
    model = peaky_model()
    with compress(model, "full", None, max_new_tokens=4):
        with pytest.raises(NotImplementedError):
            model.generate(prompt(length=20), max_new_tokens=3, num_beams=2, do_sample=False)


# ------------------------------------------------------------------ forks of a shared prefill
def _source_layer(slots=40, max_new=4, seed=0):
    from rocketkv.core.cache import CompressedLayer
    from rocketkv.core.methods.full import FullKV
    from rocketkv.core.state import GenerationState

    gen = torch.Generator().manual_seed(seed)
    state = GenerationState(FullKV(), max_new, None, capture_window=32)
    layer = CompressedLayer(state, 0)
    with torch.inference_mode():  # as a prefill forward stores it
        layer.update(torch.randn(1, 2, slots, 8, generator=gen), torch.randn(1, 2, slots, 8, generator=gen))
    return layer, state


def _fork(source, state):
    from rocketkv.core.cache import CompressedLayer

    fork = CompressedLayer(state, 0)
    fork.share(source)
    return fork


def _kv(seed, n=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)


def test_forks_start_from_the_shared_prefill_and_never_write_it():
    source, state = _source_layer()
    prefix_k, prefix_v = stored(source, "keys").clone(), stored(source, "values").clone()
    a, b = _fork(source, state), _fork(source, state)
    assert a.keys.data_ptr() == source.keys.data_ptr() and a.stored == a.seen == 40  # read, not copied, until it grows
    fed_a, fed_b = _kv(1, 3), _kv(2, 5)
    a.update(*fed_a)
    for i in range(5):  # b one step at a time
        b.update(fed_b[0][:, :, i:i + 1], fed_b[1][:, :, i:i + 1])
    for layer, (k, v) in ((a, fed_a), (b, fed_b)):
        assert layer.keys.data_ptr() != source.keys.data_ptr()  # its own buffers from the first append on
        assert torch.equal(stored(layer, "keys"), torch.cat([prefix_k, k], dim=2))
        assert torch.equal(stored(layer, "values"), torch.cat([prefix_v, v], dim=2))
        assert stored(layer, "positions")[0, 0].tolist() == list(range(40 + k.shape[2]))
        assert layer.stored == layer.seen == 40 + k.shape[2] == int(layer.length) == int(layer.seen_t)
        assert layer.kv_bytes() == 2 * stored(layer, "keys").numel() * 4
    assert torch.equal(stored(source, "keys"), prefix_k) and torch.equal(stored(source, "values"), prefix_v)
    assert source.stored == 40


def test_eviction_of_a_fork_gathers_its_own_slots():
    source, state = _source_layer()
    prefix = stored(source, "keys").clone()
    fork = _fork(source, state)
    fork.keep(torch.tensor([[[0, 5, 39], [1, 2, 3]]]))
    assert fork.stored == 3 and fork.keys.data_ptr() != source.keys.data_ptr()
    assert torch.equal(stored(fork, "keys")[0, 0], prefix[0, 0, [0, 5, 39]])
    fork.update(*_kv(8))
    assert stored(fork, "positions")[0, 0].tolist() == [0, 5, 39, 40]
    assert torch.equal(stored(source, "keys"), prefix) and source.stored == 40


def test_a_forks_decode_peak_leaves_out_the_shared_prefill():
    """Memory records: a separate run of a cell does not hold the grid's shared prefill cache."""
    from rocketkv.harness.memory import PeakMemory
    from rocketkv.harness.sample_runs import SharedPrefill

    shared = SharedPrefill(cache=None, seconds=0.0, peak=None, held=500)
    memory = shared.memory(PeakMemory(torch.device("cpu")), 1200, 2000)
    assert memory.decode_peak == 2000 - 500 and memory.peak == 2000


@pytest.mark.parametrize("layout", ["contiguous", "view_of_a_buffer_with_room", "heads_major", "trailing_strided"])
def test_gather_slots_equals_torch_gather(layout):
    """``gather_slots`` (index_select over slot rows) picks what ``torch.gather`` along the slot axis picks, for K/V
    (trailing head dim) and positions (no trailing axis), from views of buffers with room and from layouts whose
    slot rows are not evenly strided."""
    from rocketkv.core.cache import gather_slots

    torch.manual_seed(0)
    keys = torch.randn(2, 3, 50, 8)
    if layout == "view_of_a_buffer_with_room":
        keys = torch.randn(2, 3, 64, 8)[:, :, :50]
    elif layout == "heads_major":
        keys = torch.randn(3, 2, 50, 8).transpose(0, 1)
    elif layout == "trailing_strided":
        keys = torch.randn(2, 3, 8, 50).transpose(2, 3)
    positions = torch.randint(0, 1000, (2, 3, 64))[:, :, :50]
    slots = torch.stack([torch.stack([torch.randperm(50)[:7] for _ in range(3)]) for _ in range(2)])
    assert torch.equal(gather_slots(keys, slots), torch.gather(keys, 2, slots[..., None].expand(2, 3, 7, 8)))
    assert torch.equal(gather_slots(positions, slots), torch.gather(positions, 2, slots))
