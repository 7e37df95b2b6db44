"""``decode_many`` (n consecutive decode steps in one pass, used to verify a draft) against the same steps run
one by one through ``index`` + ``decode`` (the base class's loop), for every method, on random tensors.

Each token must see only the slots before it, page metadata included: the new keys are made large so that any
leak of a later token into an earlier token's selection or page bounds changes the output.
"""
import pytest
import torch

from rocketkv.cache import CompressedLayer
from rocketkv.methods import make_method
from rocketkv.methods.base import Method
from rocketkv.session import GenerationState

CASES = [
    ("full", None, {}),
    ("snapkv", 48, {"window": 4}),
    ("snapkv", 40, {"window": 4, "selection": "group"}),
    ("topk", 24, {}),
    ("topk", 200, {}),  # k above every token's visible slots
    ("sparq", 40, {}),
    ("sparq", 140, {}),  # every visible token chosen
    ("quest", 48, {}),
    ("quest", 24, {"page_size": 4}),
    ("rocketkv", 64, {"window": 4}),
    ("rocketkv", 32, {"window": 4}),
]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def build(name, budget, options, shape, prompt, new_k, new_v, seed, device="cpu"):
    b, hkv, g, d = shape
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, prompt, d, generator=gen).to(device)
    v = torch.randn(b, hkv, prompt, d, generator=gen).to(device)
    q_window = torch.randn(b, hkv, g, 8, d, generator=gen).to(device)
    # on CUDA "auto" runs the Triton page-score kernels where a method uses them
    method = make_method(name, budget, kernels="torch" if device == "cpu" else "auto", **options)
    state = GenerationState(method, new_k.shape[2] + 2, None)
    state.plan = method.plan(prompt, new_k.shape[2] + 2, d, None, g)
    state.prompt_len, state.group_size = prompt, g
    layer = CompressedLayer(state, 0)
    layer.update(k, v)
    method.compress(layer, q_window, prompt, state.plan, d ** -0.5)
    layer.compressed = True
    method.index(layer, state.plan)
    layer.update(new_k.to(device), new_v.to(device))
    return method, layer, state.plan


@pytest.mark.parametrize("name,budget,options", CASES)
@pytest.mark.parametrize("shape", [(1, 2, 3, 16), (2, 1, 1, 8)])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_many_equals_the_steps_one_by_one(name, budget, options, shape, device):
    b, hkv, g, d = shape
    prompt, n = 61, 7
    gen = torch.Generator().manual_seed(11)
    new_k = torch.randn(b, hkv, n, d, generator=gen) * 4  # later tokens would dominate if they leaked
    new_v = torch.randn(b, hkv, n, d, generator=gen) * 4
    q = torch.randn(b, hkv, g, n, d, generator=gen).to(device)
    method, layer, plan = build(name, budget, options, shape, prompt, new_k, new_v, seed=3, device=device)
    _, ref_layer, _ = build(name, budget, options, shape, prompt, new_k, new_v, seed=3, device=device)
    first = layer.stored - n
    out, cost = method.decode_many(layer, q, first, plan, d ** -0.5)
    ref_out, ref_cost = Method.decode_many(method, ref_layer, q, first, plan, d ** -0.5)
    assert out.shape == (b, hkv, g, n, d)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.as_tensor(cost.attended, device=device), ref_cost.attended)
    torch.testing.assert_close(torch.as_tensor(cost.elements, device=device), ref_cost.elements)


@pytest.mark.parametrize("name,budget,options", [c for c in CASES if c[0] in ("quest", "rocketkv")])
def test_decode_many_pages_start_mid_page(name, budget, options):
    """The first token lands inside a partly filled page: its bounds must hold the earlier slots of that page
    and none of the later ones."""
    b, hkv, g, d = 1, 2, 2, 8
    gen = torch.Generator().manual_seed(5)
    for prompt in (58, 59, 60, 61, 62, 63):
        n = 5
        new_k = torch.randn(b, hkv, n, d, generator=gen) * 6
        new_v = torch.randn(b, hkv, n, d, generator=gen)
        q = torch.randn(b, hkv, g, n, d, generator=gen)
        method, layer, plan = build(name, budget, options, (b, hkv, g, d), prompt, new_k, new_v, seed=prompt)
        _, ref_layer, _ = build(name, budget, options, (b, hkv, g, d), prompt, new_k, new_v, seed=prompt)
        first = layer.stored - n
        out, _ = method.decode_many(layer, q, first, plan, d ** -0.5)
        ref_out, _ = Method.decode_many(method, ref_layer, q, first, plan, d ** -0.5)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,budget", [("topk", 24), ("sparq", 40)])
def test_decode_many_respects_per_head_visibility(name, budget):
    """Slots a head may not see (``layer.visible``, as after a per-head eviction) stay hidden from every token."""
    shape, prompt, n = (1, 2, 3, 16), 61, 5
    b, hkv, g, d = shape
    gen = torch.Generator().manual_seed(17)
    new_k, new_v = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    q = torch.randn(b, hkv, g, n, d, generator=gen)
    hidden_prompt = torch.rand(b, hkv, g, prompt, generator=gen) < 0.5
    layers = []
    for _ in range(2):
        method, layer, plan = build(name, budget, {}, shape, prompt, new_k, new_v, seed=3)
        layer.visible = torch.cat([~hidden_prompt, torch.ones(b, hkv, g, n, dtype=torch.bool)], dim=-1)
        layers.append(layer)
    first = layers[0].stored - n
    out, cost = method.decode_many(layers[0], q, first, plan, d ** -0.5)
    ref_out, ref_cost = Method.decode_many(method, layers[1], q, first, plan, d ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.as_tensor(cost.attended), ref_cost.attended)
