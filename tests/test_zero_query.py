"""An all-zero query (an all-zero embedding row reproduces it) gives a finite, defined decode step.

SparQ's and HSA's approximate scores are divided by a temperature ``sqrt(d·‖q_I‖₁/‖q‖₁)``, which is 0/0 for
a zero query.  The defined result: its approximate scores are uniform over the visible slots, the top-k cut keeps
the lowest slots (the ties rule), and the exact attention of a zero query over them is the mean of their values.
The tests drive the public method hooks (``plan``/``index``/``decode``) and a whole model, never the internals.
"""
import pytest
import torch

from rocketkv import compress
from rocketkv.core.cache import CompressedLayer
from rocketkv.core.methods import make_method
from rocketkv.core.state import GenerationState
from rocketkv.harness.models import build_tiny_random

B, HKV, G, D, N = 1, 2, 3, 16, 96


def layer_for(method, k, v, max_new=8):
    state = GenerationState(method, max_new, None)
    state.plan = method.plan(k.shape[2], max_new, k.shape[-1], None, G)
    state.prompt_len, state.group_size = k.shape[2], G
    layer = CompressedLayer(state, 0)
    layer.update(k, v)
    state.layers = [layer]
    method.index(layer, state.plan, layer.stored)
    return layer, state.plan


@pytest.mark.parametrize("name", ["hsa", "rocketkv", "sparq"])
def test_a_zero_query_gives_the_mean_of_the_lowest_slots(name):
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, HKV, N, D, generator=gen), torch.randn(B, HKV, N, D, generator=gen)
    method = make_method(name, budget=32)
    layer, plan = layer_for(method, k, v)
    assert not plan.get("dense")
    q = torch.randn(B, HKV, G, D, generator=gen)
    q[:, 0] = 0.0  # every query head of KV group 0 is zero; group 1 is an ordinary query
    out, cost = method.decode(layer, q, torch.tensor(N), plan, D ** -0.5)
    assert torch.isfinite(out).all()
    kk = plan["topk"]
    y_k = v[:, 0, :kk].double().mean(dim=1)  # [B, d]: uniform softmax over the k lowest slots
    if name == "sparq":  # mean-value reallocation with alpha = k/n of the uniform approximate scores
        alpha = kk / N
        expected = alpha * y_k + (1 - alpha) * v[:, 0].double().mean(dim=1)
    else:
        expected = y_k
    for head in range(G):
        torch.testing.assert_close(out[:, 0, head].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(torch.as_tensor(cost.attended)).all() and float(cost.attended) > 0


@pytest.mark.parametrize("name", ["hsa", "sparq"])
def test_one_zero_head_in_a_group_stays_finite(name):
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(B, HKV, N, D, generator=gen), torch.randn(B, HKV, N, D, generator=gen)
    method = make_method(name, budget=32)
    layer, plan = layer_for(method, k, v)
    q = torch.randn(B, HKV, G, D, generator=gen)
    q[:, 1, 0] = 0.0
    out, _ = method.decode(layer, q, torch.tensor(N), plan, D ** -0.5)
    assert torch.isfinite(out).all()
    if name == "sparq":  # SparQ selects per head: the zero head alone gets the defined result
        kk, alpha = plan["topk"], plan["topk"] / N
        expected = alpha * v[:, 1, :kk].double().mean(dim=1) + (1 - alpha) * v[:, 1].double().mean(dim=1)
        torch.testing.assert_close(out[:, 1, 0].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["hsa", "rocketkv", "sparq"])
def test_a_zero_embedding_row_decodes_to_finite_logits(name):
    model, tok = build_tiny_random()
    zero_token = 5
    with torch.no_grad():
        model.get_input_embeddings().weight[zero_token] = 0.0  # its queries in layer 0 are exactly zero
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(10, len(tok), (1, 300), generator=gen)
    ids[0, -1] = zero_token  # decoded as a step (the last prompt token), then generation goes on
    with compress(model, method=name, budget=32, max_new_tokens=4) as session:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    assert not session.plan.get("dense")
    assert all(torch.isfinite(s).all() for s in out.scores)
