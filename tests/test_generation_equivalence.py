"""End-to-end on tiny random models: compressed generation against stock transformers greedy decoding.

The tiny random models are made "peaky" (q/k projections scaled up, embeddings/lm_head scaled) so attention is far
from uniform and greedy decoding produces varied tokens; otherwise every method would trivially agree.
"""
import functools

import pytest
import torch

from conftest import greedy_steps, peaky_model, prompt_logits, stored
from rocketkv.harness.models import TINY_ARCHS
from rocketkv.core.session import compress

PROMPT_LEN, MAX_NEW = 90, 10
CONTEXT = PROMPT_LEN + MAX_NEW


def group_size(model):
    cfg = model.config
    return cfg.num_attention_heads // cfg.num_key_value_heads


def prompt(batch=1, length=PROMPT_LEN, seed=0):
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def stock_generate(model, ids, max_new=MAX_NEW):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


@functools.lru_cache(maxsize=None)
def stock_reference(arch, batch, seed, max_new=MAX_NEW):
    """Stock greedy generation (no compression), computed once per (arch, prompt)."""
    return stock_generate(peaky_model(arch), prompt(batch=batch, seed=seed), max_new)


def big_budget(model, method, selection="head"):
    # every method is exact once its budget covers at least 2x the whole context (k = t/2 >= context);
    # snapkv's per-query-head selection keeps t/g tokens per head, so it needs t >= g x context (here 2 g x context)
    if method == "full":
        return None
    if method == "snapkv" and selection == "head":
        return 2 * CONTEXT * group_size(model)
    return 2 * CONTEXT + 1


METHODS = [("full", {}), ("topk", {}), ("snapkv", {"selection": "head"}), ("snapkv", {"selection": "group"}),
           ("quest", {}), ("sparq", {}), ("rocketkv", {}), ("hsa", {})]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_equals_stock_generate(arch):
    model = peaky_model(arch)
    ids = prompt()
    ref_tokens, ref_logits = stock_generate(model, ids)
    assert len(set(ref_tokens[0].tolist())) > 3  # the model is not degenerate
    with compress(model, "full", None, max_new_tokens=MAX_NEW) as session:
        tokens, logits = stock_generate(model, ids)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert session.stats()["decode_steps"] == MAX_NEW
    assert model.config._attn_implementation != "rocketkv"  # restored on exit


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method,opts", METHODS)
def test_methods_with_large_budget_equal_stock(arch, method, opts):
    model = peaky_model(arch)
    ids = prompt(seed=1)
    ref_tokens, ref_logits = stock_reference(arch, 1, 1)
    budget = big_budget(model, method, opts.get("selection", "head"))
    with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts) as session:
        tokens, logits = stock_generate(model, ids)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert session.stats()["kept_tokens"] == PROMPT_LEN - 1  # nothing evicted from prompt[:-1]


@pytest.mark.parametrize("method,opts", METHODS[1:])
def test_dense_plan_runs_bit_for_bit_as_full_kv(method, opts):
    """A budget that covers the sequence makes the plan dense: same logits, tokens and statistics as full KV."""
    model = peaky_model("llama")
    ids = prompt(seed=1)
    runs = {}
    covering = big_budget(model, method, opts.get("selection", "head"))
    for name, budget, o in [("full", None, {}), (method, covering, opts)]:
        with compress(model, name, budget, max_new_tokens=MAX_NEW, **o) as session:
            tokens, logits = stock_generate(model, ids)
        runs[name] = tokens, logits, session.stats(), session.plan
    assert runs[method][3]["dense"]
    assert runs[method][0].tolist() == runs["full"][0].tolist()
    assert torch.equal(runs[method][1], runs["full"][1])
    assert runs[method][2] == runs["full"][2]


def test_hsa_own_decode_at_a_covering_budget_equals_stock(monkeypatch):
    """A covering budget marks HSA's plan dense (run as full KV); with that flag off its own page scores and top-k
    run every step, and with k = t/2 >= the sequence they must select every slot: stock generation's tokens."""
    from rocketkv.core.methods.hsa import HybridSparseAttention

    planned = HybridSparseAttention.plan
    monkeypatch.setattr(HybridSparseAttention, "plan", lambda self, *a, **k: {**planned(self, *a, **k), "dense": False})
    model = peaky_model("llama")
    ref_tokens, ref_logits = stock_reference("llama", 1, 1)
    with compress(model, "hsa", 2 * CONTEXT, max_new_tokens=MAX_NEW) as session:
        tokens, logits = stock_generate(model, prompt(seed=1))
    assert not session.plan["dense"] and session.plan["page_size"] == 1
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert session.stats()["metadata_bytes"] > 0  # the page tables were built: HSA's own decode ran


@pytest.mark.parametrize("method,opts", METHODS)
def test_batch_of_two_with_large_budget_equals_stock(method, opts):
    model = peaky_model("llama")
    ids = prompt(batch=2, seed=2)
    ref_tokens, ref_logits = stock_reference("llama", 2, 2, 6)
    budget = big_budget(model, method, opts.get("selection", "head"))
    with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts):
        tokens, logits = stock_generate(model, ids, max_new=6)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


SMALL = [("full", None, {}), ("topk", 32, {}), ("snapkv", 48 * 4, {"selection": "head"}),
         ("snapkv", 48, {"selection": "group"}), ("quest", 32, {}), ("sparq", 32, {}), ("rocketkv", 32, {}),
         ("rocketkv", 32, {"skip_layers": 2}), ("hsa", 32, {})]


def manual_loop(model, cache, ids, max_new):
    return greedy_steps(model, cache, prompt_logits(model, cache, ids), max_new)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method,budget,opts", SMALL)
def test_manual_loop_equals_generate_inside_compress(arch, method, budget, opts):
    model = peaky_model(arch)
    ids = prompt(seed=3)
    if method == "snapkv" and opts["selection"] == "head":
        budget = 48 * group_size(model)
    with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts) as session:
        gen_tokens, gen_logits = stock_generate(model, ids)
        gen_stats = session.stats()
        man_tokens, man_logits = manual_loop(model, session.new_cache(), ids, MAX_NEW)
        man_stats = session.stats()
    assert man_tokens.tolist() == gen_tokens.tolist()
    torch.testing.assert_close(man_logits, gen_logits, atol=1e-4, rtol=1e-4)
    assert man_stats["kept_tokens"] == gen_stats["kept_tokens"]
    if method != "full":
        assert gen_stats["kept_tokens"] < PROMPT_LEN - 1 or method in ("topk", "quest", "sparq", "hsa")


@pytest.mark.parametrize("method,budget,opts", [("full", None, {}), ("snapkv", 48 * 4, {"selection": "head"}),
                                                ("snapkv", 48, {"selection": "group"}), ("rocketkv", 64, {})])
def test_multi_token_step_after_eviction_equals_one_by_one(method, budget, opts):
    """Feeding 3 tokens at once to a compressed cache gives the logits of feeding them one by one.

    Dense decode (full, snapkv after its eviction) must match.  rocketkv is included with t = 64 on this
    context: stage 1 evicts (89 -> P = 79 prompt tokens) and stage 2 plans page size p = 1, so each token's
    selection depends only on slots before it and must match too.  With pages of p > 1 (and for Quest) the
    selection of a token inside a multi-token step can differ: see
    test_methods_reference.test_page_metadata_ignores_slots_beyond_upto.
    """
    model = peaky_model("llama")
    ids = prompt(seed=4)
    extra = torch.randint(3, 1000, (1, 3), generator=torch.Generator().manual_seed(5))
    with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts) as session:
        with torch.no_grad():
            c1 = session.new_cache()
            model(input_ids=ids, past_key_values=c1, use_cache=True)
            if method != "full":
                assert c1.layers[0].stored < PROMPT_LEN  # eviction happened
            if method == "rocketkv":
                assert session.plan["page_size"] == 1 and session.plan["prompt_budget"] == 79
            many = model(input_ids=extra, past_key_values=c1, use_cache=True).logits
            c2 = session.new_cache()
            model(input_ids=ids, past_key_values=c2, use_cache=True)
            one = torch.cat([model(input_ids=extra[:, i:i + 1], past_key_values=c2, use_cache=True).logits
                             for i in range(3)], dim=1)
    torch.testing.assert_close(many, one, atol=1e-4, rtol=1e-4)
    assert c1.get_seq_length() == c2.get_seq_length() == PROMPT_LEN + 3
    for l1, l2 in zip(c1.layers, c2.layers):
        assert torch.equal(stored(l1, "positions"), stored(l2, "positions"))


# ------------------------------------------------------------------ refusals
def test_refuses_sliding_window_mistral():
    from transformers import AutoModelForCausalLM

    from rocketkv.harness.models import tiny_config

    cfg = tiny_config("mistral")
    cfg.sliding_window = 64
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="sliding"):
        with compress(model, "rocketkv", 256):
            pass


def test_refuses_model_without_rope():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                       bos_token_id=0, eos_token_id=1))
    with pytest.raises(ValueError, match="RoPE"):
        with compress(model, "rocketkv", 256):
            pass
    assert model.config._attn_implementation != "rocketkv"


def test_refuses_padded_batch():
    model = peaky_model("llama")
    ids = prompt(batch=2, length=40)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with compress(model, "full", None):
        with pytest.raises(NotImplementedError, match="padded"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_refuses_precomputed_uncompressed_cache():
    from transformers import DynamicCache

    model = peaky_model("llama")
    ids = prompt(length=20)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        with compress(model, "rocketkv", 256):
            with pytest.raises(ValueError, match="already holds tokens"):
                model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("name", ["own", "past_key_values"])
def test_user_cache_is_compressed_under_either_kwarg(name):
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` (old name: a deprecated alias)."""
    import warnings

    from transformers import DynamicCache

    from rocketkv.harness.generation import forward
    from rocketkv.core.session import cache_kwarg

    model = peaky_model("llama")
    ids = prompt()[0].tolist()
    key = cache_kwarg(model) if name == "own" else name
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), compress(model, "snapkv", 48, max_new_tokens=3, selection="group") as session:
        model(input_ids=torch.tensor([ids]), use_cache=True, **{key: cache})
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the runner's own loop uses the model's own name
            for token in ids[:3]:
                forward(model, [[token]], cache)
    assert all(type(l).__name__ == "CompressedLayer" for l in cache.layers)
    assert session.stats()["decode_steps"] == 4  # the prompt's last token, then 3 steps
    assert cache.layers[0].stored < len(ids) + 3


def test_bad_budget_refused_before_touching_model():
    model = peaky_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="budget"):
        with compress(model, "rocketkv", 8):
            pass
    assert model.config._attn_implementation == before


# ------------------------------------------------------------------ split prefill and shared-prefill forks
@pytest.mark.parametrize("method,budget,opts", SMALL)
def test_split_prompt_feed_equals_whole_prompt(method, budget, opts):
    """``new_cache(prompt_len=L)``: feed prompt[:-1], then the last prompt token as the first decode step."""
    model = peaky_model("llama")
    ids = prompt(seed=6)
    with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts) as session:
        ref_tokens, ref_logits = manual_loop(model, session.new_cache(), ids, MAX_NEW)
        ref_stats = session.stats()
        cache = session.new_cache(prompt_len=PROMPT_LEN)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
            first = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
        tokens, logits = greedy_steps(model, cache, first, MAX_NEW)
        stats = session.stats()
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert stats["kept_tokens"] == ref_stats["kept_tokens"]
    assert stats["decode_steps"] == ref_stats["decode_steps"]


def shared_prefill(model, ids, capture_window):
    """A dense prefill of ``prompt[:-1]`` that keeps its last queries, as a grid run makes once per sample."""
    with compress(model, "full", None, max_new_tokens=MAX_NEW) as full_session:
        shared = full_session.new_cache(prompt_len=PROMPT_LEN, capture_window=capture_window)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=shared, use_cache=True)
    return shared


def test_fork_from_shared_prefill_equals_direct():
    model = peaky_model("llama")
    ids = prompt(seed=8)
    shared = shared_prefill(model, ids, capture_window=32)
    snapshot = [tuple(stored(l, n).clone() for n in ("keys", "values", "positions")) for l in shared.layers]
    for method, budget, opts in SMALL:
        with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts) as session:
            ref_tokens, ref_logits = manual_loop(model, session.new_cache(), ids, MAX_NEW)
            ref_kept = session.stats()["kept_tokens"]
            cache = session.fork(shared)
            with torch.no_grad():
                first = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
            tokens, logits = greedy_steps(model, cache, first, MAX_NEW)
            assert session.stats()["kept_tokens"] == ref_kept, method
        assert tokens.tolist() == ref_tokens.tolist(), (method, opts)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        for (k, v, p), layer in zip(snapshot, shared.layers):  # the shared prefill is only read
            assert all(torch.equal(stored(layer, n), t) for n, t in zip(("keys", "values", "positions"), (k, v, p)))


def test_fork_refuses_short_capture():
    model = peaky_model("llama")
    ids = prompt(seed=8)
    shared = shared_prefill(model, ids, capture_window=8)
    with compress(model, "rocketkv", 32, max_new_tokens=MAX_NEW) as session:
        with pytest.raises(ValueError, match="capture_window"):
            session.fork(shared)
