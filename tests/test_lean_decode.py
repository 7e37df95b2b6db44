"""The lean decode step: selection rules against plain references, the Triton selection kernels against torch (in the
interpreter), half-precision top-k / SparQ / selected-slot attention, statistics in closed form, the kernel counter."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rocketkv.core import kernels
from rocketkv.core.methods import make_method, ops
from rocketkv.core.methods.ops import attend_indices, topk_slots
from test_methods_reference import make_layer, ref_attend, spy_indices

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def naive_slot_order(scores):
    """Slots of a 1-D score row in (score desc, slot asc) order, -inf left out."""
    return sorted((s for s in range(scores.numel()) if scores[s] != float("-inf")), key=lambda s: (-scores[s], s))


@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_topk_slots_keeps_the_tie_rule(k):
    scores = torch.randint(-3, 4, (2, 3, 30), generator=_gen(k)).float()  # many exact ties
    scores[0, 0, ::3] = float("-inf")
    got = topk_slots(scores, k)
    for row, want_row in zip(got.view(-1, got.shape[-1]), scores.view(-1, 30)):
        want = sorted(naive_slot_order(want_row)[:k])
        assert row.tolist() == want + [-1] * (min(k, 30) - len(want))


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("page_size,budget,upto", [(3, 10, 40), (4, 7, 17), (1, 6, 20), (5, 100, 23)])
def test_select_units_is_the_slot_space_rule(split, page_size, budget, upto):
    """Pages ranked by (score desc, page asc); with ``split`` the first ``budget`` slots of that order (each page's
    live slots ascending), else the live slots of the first ``budget`` live pages."""
    pages = 12
    scores = torch.randint(0, 4, (2, 2, pages), generator=_gen(upto)).float()
    idx, count, _ = kernels.reference.select_units(scores, torch.tensor(upto), page_size, budget, 64, split)
    n_live = -(-upto // page_size)
    for row, c, s in zip(idx.view(-1, 64), count.view(-1), scores.view(-1, pages)):
        order = [p for p in naive_slot_order(s) if p < n_live]
        slots = [p * page_size + t for p in (order if split else order[:budget]) for t in range(page_size)
                 if p * page_size + t < upto]
        want = sorted(slots[:budget] if split else slots)
        assert row.tolist() == want + [-1] * (64 - len(want)) and int(c) == len(want)


@pytest.mark.parametrize("units", [5000, 4099])  # blocks that divide the row; a prime row, padded
@pytest.mark.parametrize("kind", ["random", "ties", "dead -inf"])
@pytest.mark.parametrize("page_size,split", [(1, False), (3, True), (2, False)])
def test_select_units_prunes_long_rows_exactly(kind, page_size, split, units):
    """Rows of many units are searched only in the blocks with the best maxima (``_prune_block`` > 1 here): the
    units chosen are those of the plain rule, ties at the cut to the lower unit, and SparQ's mass is unchanged."""
    budget = 24 if split else 20
    gen = _gen(units + page_size)
    scores = {"random": torch.randn(2, 3, units, generator=gen),
              "ties": torch.randint(0, 3, (2, 3, units), generator=gen).float(),
              "dead -inf": torch.randn(2, 3, units, generator=gen)}[kind]
    upto = units * page_size - 7
    if kind == "dead -inf":
        scores[..., units // 2:] = float("-inf")
        scores[..., ::5] = 2.5  # tied units that straddle block edges
    m = -(-budget // page_size) + 1 if split else budget
    assert kernels.reference._prune_block(units, m) > 1
    idx, count, mass = kernels.reference.select_units(scores, torch.tensor(upto), page_size, budget, 64, split,
                                                      mass=page_size == 1)
    n_live = -(-upto // page_size)
    for row, c, s in zip(idx.view(-1, 64), count.view(-1), scores.view(-1, units)):
        order = [u for u in naive_slot_order(s) if u < n_live] + [u for u in range(n_live) if s[u] == float("-inf")]
        slots = [u * page_size + t for u in (order if split else order[:budget]) for t in range(page_size)
                 if u * page_size + t < upto]
        want = sorted(slots[:budget] if split else slots)
        assert row.tolist() == want + [-1] * (64 - len(want)) and int(c) == len(want)
    if page_size == 1:  # the softmax over the live slots only: the units past upto have finite scores here
        probs = torch.softmax(scores[..., :upto], dim=-1)
        want_mass = torch.stack([probs.reshape(-1, upto)[i, r[r >= 0]].sum() for i, r in enumerate(idx.view(-1, 64))])
        torch.testing.assert_close(mass.view(-1), want_mass)


@pytest.mark.parametrize("past,units", [("-inf", 40), ("-inf", 5000), ("zero", 40), ("zero", 5000)])
@pytest.mark.parametrize("page_size,split", [(1, False), (3, True), (4, False)])
def test_select_units_masked_skips_only_a_mask_already_there(past, units, page_size, split):
    """``masked=True`` (the methods' scores: -inf past upto, or HSA's probability 0 under live ones >= 0) selects
    what masking them again does, and with -inf the same mass; on scores that are not masked it would not."""
    gen = _gen(units + page_size)
    scores = torch.randint(0, 3, (2, 3, units), generator=gen).float() / 2  # ties, and live zeros
    upto = units * page_size - 2 * page_size - 1
    n_live = -(-upto // page_size)
    args = (torch.tensor(upto), page_size, 24, 48, split, page_size == 1)
    plain = kernels.reference.select_units(scores, *args)
    if page_size == 1:  # unmasked, the best units past upto would be chosen
        assert not torch.equal(kernels.reference.select_units(scores + (torch.arange(units) >= upto) * 9, *args,
                                                              masked=True)[0], plain[0])
    scores[..., n_live:] = float("-inf") if past == "-inf" else 0.0
    got = kernels.reference.select_units(scores, *args, masked=True)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    if page_size == 1 and past == "-inf":  # the mass of -inf scores is 0 either way (0 scores would count)
        torch.testing.assert_close(got[2], plain[2])


@pytest.mark.parametrize("g,d,p,r", [(4, 32, 3, 5), (1, 16, 1, 16), (3, 12, 4, 2)])
def test_hsa_page_probs_equal_the_slot_space_softmax(g, d, p, r):
    """Per head a softmax over the live slots of the page scores (each slot its page's), averaged over the group:
    computed in page space it is the slot-space value of every slot of the page, and selects the same slots."""
    b, hkv, cap, upto = 2, 2, 61, 58
    q = torch.randn(b, hkv, g, d, generator=_gen(1))
    low = torch.randn(b, hkv, d, -(-cap // p), generator=_gen(2))
    high = low + torch.rand(low.shape, generator=_gen(3))
    probs = kernels.hsa_page_probs(q, low, high, torch.tensor(upto), p, r, backend="torch")  # [B,Hkv,P]
    qd = q.double()
    ch = qd.abs().sum(2).topk(r, dim=-1).indices
    for bi in range(b):
        for h in range(hkv):
            slot_probs = torch.zeros(upto, dtype=torch.float64)
            use_max = qd[bi, h].sum(0)[ch[bi, h]] > 0
            rows = torch.where(use_max[:, None], high[bi, h, ch[bi, h]], low[bi, h, ch[bi, h]]).double()
            for j in range(g):
                tau = math.sqrt(d * qd[bi, h, j, ch[bi, h]].abs().sum() / qd[bi, h, j].abs().sum())
                logits = (qd[bi, h, j, ch[bi, h]] @ rows).repeat_interleave(p)[:upto] / tau
                slot_probs += torch.softmax(logits, 0) / g
            page_probs = probs[bi, h].double().repeat_interleave(p)[:upto]
            torch.testing.assert_close(page_probs, slot_probs, atol=1e-7, rtol=1e-5)
            got = kernels.select_units(probs[bi, h][None, None], torch.tensor(upto), p, 20, 20, True,
                                       backend="torch")[0]
            assert got.flatten().tolist() == sorted(naive_slot_order(slot_probs.float())[:20])


def test_attend_indices_half_precision_at_an_odd_capacity(monkeypatch):
    """The selection mask handed to SDPA starts at its buffer's start (SDPA's memory-efficient CUDA kernel refuses
    a half-precision bias view at offset 1 when (C+1) % 8 == 0), and bf16 attention equals the float reference."""
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", spy)
    b, hkv, g, d, n = 1, 2, 4, 16, 39
    m = make_method("topk", 64, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=4)  # capacity n + 16
    layer.keys, layer.values = layer.keys.bfloat16(), layer.values.bfloat16()
    assert (layer.capacity + 1) % 8 == 0
    q = torch.randn(b, hkv, g, d, generator=_gen(5)).bfloat16()
    idx = torch.stack([torch.randperm(n, generator=_gen(6 + i))[:12] for i in range(b * hkv * g)]).view(b, hkv, g, 12)
    idx[..., -3:] = -1
    out = attend_indices(layer, q, idx, d ** -0.5)
    assert masks and masks[-1].storage_offset() == 0
    for h in range(hkv):
        for j in range(g):
            sel = idx[0, h, j][idx[0, h, j] >= 0]
            ref = ref_attend(q[0, h, j].double(), layer.keys[0, h, sel].double(), layer.values[0, h, sel].double(),
                             d ** -0.5)
            torch.testing.assert_close(out[0, h, j].double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", ["topk", "sparq"])
def test_half_precision_cache_selects_as_float_and_matches_to_rounding(monkeypatch, name):
    """A bf16 cache is scored in fp32 without an fp32 copy of K: the same selection as the same values held in
    fp32, and the output equal to bf16 rounding."""
    b, hkv, g, d, n = 1, 2, 4, 32, 300
    m = make_method(name, 64, kernels="torch")
    seen = spy_indices(monkeypatch, name)
    outs = []
    for dtype in (torch.bfloat16, torch.float32):
        layer, _, _ = make_layer(m, b, hkv, g, d, n, seed=8)
        layer.keys = layer.keys.bfloat16().to(dtype)
        layer.values = layer.values.bfloat16().to(dtype)
        q = torch.randn(b, hkv, g, d, generator=_gen(9)).bfloat16().to(dtype)
        m.index(layer, layer.state.plan, n)
        outs.append(m.decode(layer, q, torch.tensor(n), layer.state.plan, d ** -0.5)[0])
    assert torch.equal(seen[0], seen[1])
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0].float(), outs[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name,budget", [("topk", 24), ("sparq", 24), ("quest", 24), ("hsa", 24), ("snapkv", 64)])
def test_statistics_in_closed_form_equal_the_steps_costs(name, budget):
    """The summary (static costs summed once over the steps' slot counts, data-dependent counts summed on the
    device) equals the sum of each step's own cost."""
    b, hkv, g, d, n = 2, 2, 4, 16, 97
    m = make_method(name, budget, kernels="torch", window=4)
    layer, _, _ = make_layer(m, b, hkv, g, d, n, seed=3)
    plan = layer.state.plan
    m.compress(layer, torch.randn(b, hkv, g, 8, d, generator=_gen(4)), n, plan, d ** -0.5)
    m.index(layer, plan, layer.stored)
    attended = elements = 0.0
    for step in range(5):
        layer.update(torch.randn(b, hkv, 1, d, generator=_gen(5 + step)), torch.randn(b, hkv, 1, d,
                                                                                     generator=_gen(9 + step)))
        upto = torch.tensor(layer.stored)
        m.index(layer, plan, upto)
        _, cost = m.decode(layer, torch.randn(b, hkv, g, d, generator=_gen(20 + step)), upto, plan, d ** -0.5)
        layer.state.stats.record(layer, layer.stored, cost)
        attended, elements = attended + cost.attended, elements + cost.elements
    summary = layer.state.summary()
    assert summary["decode_steps"] == 5
    assert summary["attended_tokens"] == pytest.approx(attended / 5, rel=1e-12)
    assert summary["elements_read_per_step"] == pytest.approx(elements / 5, rel=1e-12)


def _load_step_kernels():
    spec = importlib.util.spec_from_file_location("step_kernels", REPO / "benchmarks" / "step_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_counter_counts_kernels_not_views():
    counter_cls = _load_step_kernels().KernelCounter
    a = torch.randn(4, 6)
    with counter_cls() as counter:
        b = (a + 1).view(6, 4).t()  # add: 1; view, t: none
        c = b.sum(0).unsqueeze(0)  # sum: 1
        c.mul_(2)  # 1
        torch.empty(3)  # an allocation: none
        a[1:, ::2].detach()  # views: none
    assert counter.ops == {"add": 1, "sum": 1, "mul_": 1} and counter.total == 3


def _run(args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), **(env or {})))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_counter_counts_triton_launches_once():
    code = ("import importlib.util, torch\n"
            "spec = importlib.util.spec_from_file_location('sk', 'benchmarks/step_kernels.py')\n"
            "sk = importlib.util.module_from_spec(spec); spec.loader.exec_module(sk)\n"
            "from rocketkv.core import kernels\n"
            "scores = torch.randn(1, 2, 40)\n"
            "with sk.KernelCounter() as c:\n"
            "    kernels.select_units(scores, torch.tensor(37), 1, 5, 5, False, backend='triton')\n"
            "print(c.ops)\n"
            "assert c.ops == {'triton:_select_kernel': 1}, c.ops\n")
    result = _run(["-c", code])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_selection_kernels_match_torch_in_interpreter():
    result = _run(["tests/selection_interpret_check.py"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_selection_kernels_match_torch_at_llama_8b_plans():
    """Llama-8B heads (32 q / 8 kv, d = 128), the page size, channels and top-k of 16k-96k plans, batch 1 and 8."""
    result = _run(["tests/selection_interpret_check.py", "--large"])
    assert result.returncode == 0, result.stdout + result.stderr
