"""The numba CPU kernels (``kernels.numba_cpu``) against the torch reference: selections exactly (ties, -0.0, -inf,
long rows, smooth rows, rows that defeat the sampled bound), attention and masses to rounding, read counts exactly;
which backend ``auto`` picks; and whole generations, numba against torch, giving the same tokens."""
import pytest
import torch

from rocketkv.core import kernels
from rocketkv.core.kernels import reference
from rocketkv.core.methods import make_method
from rocketkv.core.methods.ops import attend_indices
from rocketkv.core.graphs import DecodeStep
from test_decode_step import greedy, prompts
from test_methods_reference import make_layer

numba_cpu = pytest.importorskip("rocketkv.core.kernels.numba_cpu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(kind, shape, seed):
    x = torch.randn(shape, generator=_gen(seed))
    if kind == "ties":
        return x.mul(2).round()  # many exact ties, -0.0 among them
    if kind == "smooth":  # rises and falls slowly along the row, as SparQ's scores over RoPE'd keys do
        return torch.sin(torch.arange(shape[-1]) / 300.0) + 1e-3 * x
    if kind == "dead -inf":
        x[..., ::3] = float("-inf")
        return x
    if kind == "sample-defeating":  # every 8th unit (the sample) best: the sampled bound lets too few through
        x[..., ::8] += 100.0
        return x
    return x


def _check(scores, upto, page_size, budget, width, split, mass):
    upto = torch.tensor(upto)
    want = reference.select_units(scores, upto, page_size, budget, width, split, mass)
    got = numba_cpu.select(scores, upto, page_size, budget, width, split, mass)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if mass:
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "ties", "smooth", "dead -inf", "sample-defeating"])
@pytest.mark.parametrize("units", [1, 37, 1500, 5003])  # the sampled bound from 1,024 units
@pytest.mark.parametrize("budget", [1, 9, 256])
def test_slot_selection_equals_the_reference(kind, units, budget):
    scores = _rows(kind, (2, 3, units), units + budget)
    for upto in {units, max(1, units // 3)}:
        _check(scores, upto, 1, budget, min(budget, units), False, mass=kind != "dead -inf")


def test_masked_rows_give_the_same_mass():
    """``masked`` (-inf past upto) takes the mass's softmax over whole rows: the same shares as over the live part."""
    scores = _rows("random", (2, 3, 3000), 5)
    upto = torch.tensor(2100)
    scores[..., 2100:] = float("-inf")
    want = reference.select_units(scores, upto, 1, 64, 64, False, True)
    got = numba_cpu.select(scores, upto, 1, 64, 64, False, True, masked=True)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "ties", "smooth"])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("page_size,pages,budget", [(4, 30, 10), (16, 1100, 64), (3, 7, 100), (90, 90, 128)])
def test_page_selection_equals_the_reference(kind, split, page_size, pages, budget):
    scores = _rows(kind, (1, 4, pages), page_size * pages)
    m = -(-budget // page_size) + 1 if split else budget
    width = min(budget, pages * page_size) if split else min(m, pages) * page_size
    for upto in (pages * page_size, pages * page_size - page_size // 2, max(1, pages * page_size // 5)):
        _check(scores, upto, page_size, budget, width, split, mass=False)


@pytest.mark.parametrize("sets,logits", [("shared", False), ("per head", False), ("per head", True)])
def test_attention_over_selected_slots_equals_the_torch_path(sets, logits):
    b, hkv, g, d, slots, k = 2, 2, 3, 16, 300, 20
    m = make_method("topk", 64, kernels="torch")
    layer, _, _ = make_layer(m, b, hkv, g, d, slots, seed=1)
    q = torch.randn(b, hkv, g, d, generator=_gen(2))
    groups = 1 if sets == "shared" else g
    idx = torch.stack([torch.randperm(slots, generator=_gen(i))[:k] for i in range(b * hkv * groups)])
    idx = idx.view(b, hkv, groups, k).sort(-1).values
    idx[0, 0, 0, -3:] = -1  # pads
    scores = kernels.reference.scores(q, layer.keys, torch.tensor(slots)) if logits else None
    want = attend_indices(layer, q, idx, d ** -0.5, "torch", logits=scores)
    got = attend_indices(layer, q, idx, d ** -0.5, "numba", logits=scores)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_union_reads_equal_the_reference():
    idx = torch.randint(-1, 50, (2, 3, 4, 12), generator=_gen(0))
    channels = torch.randint(0, 16, (2, 3, 4, 5), generator=_gen(1))
    upto = torch.tensor(45)
    for chans in (None, channels):
        want = reference.union_reads(idx, upto, 7, chans, 50, 16)
        assert torch.equal(numba_cpu.union_reads(idx, upto, 7, 50, chans, 16), want)


def test_auto_picks_numba_for_fp32_cpu_tensors_only():
    fp32, bf16 = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    assert kernels.use_numba("auto", fp32, torch.zeros(2, dtype=torch.int64))
    assert not kernels.use_numba("auto", fp32, bf16) and not kernels.use_numba("torch", fp32)
    assert not kernels.use_triton("numba", fp32)
    with pytest.raises(ValueError, match="fp32 CPU tensors only"):
        kernels.use_numba("numba", bf16)
    with pytest.raises(ValueError, match="kernels='fast' is not valid; use auto, torch, triton or numba"):
        make_method("topk", 64, kernels="fast")


@pytest.mark.parametrize("method,budget", [("topk", 32), ("sparq", 32), ("quest", 32), ("hsa", 32),
                                           ("rocketkv", 32)])
def test_generation_with_numba_kernels_gives_the_torch_tokens(method, budget):
    """Greedy decoding of a tiny random model (batch 2), every step of the method through the numba kernels, gives
    the torch path's tokens and statistics."""
    rows = prompts(3, batch=2)
    numba_tokens, numba_stats = greedy(DecodeStep, method, budget, {"kernels": "numba"}, rows)
    torch_tokens, torch_stats = greedy(DecodeStep, method, budget, {"kernels": "torch"}, rows)
    assert numba_tokens == torch_tokens
    assert numba_stats == pytest.approx(torch_stats)


@pytest.mark.parametrize("b,hkv,g,d,pages,page_size,channels,upto", [
    (1, 3, 3, 64, 90, 90, 8, 8001), (2, 2, 4, 16, 13, 5, 3, 61), (1, 1, 1, 8, 4, 3, 8, 7), (1, 2, 3, 16, 9, 9, 4, 81)])
def test_hsa_page_probs_and_page_fold_equal_the_reference(b, hkv, g, d, pages, page_size, channels, upto):
    from rocketkv.core.methods.pages import fold_reference
    q = torch.randn(b, hkv, g, d, generator=_gen(1))
    low = torch.randn(b, hkv, d, pages, generator=_gen(2))
    high = low + torch.rand(b, hkv, d, pages, generator=_gen(3))
    for query in (q, torch.zeros_like(q)):  # a zero query: uniform over the live slots on both paths
        want = reference.hsa_page_probs(query, low, high, torch.tensor(upto), page_size, channels)
        got = numba_cpu.hsa_page_probs(query, low, high, torch.tensor(upto), page_size, channels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    keys = torch.randn(b, hkv, pages * page_size, d, generator=_gen(4))
    for newest in sorted({1, page_size, page_size + 1, upto}):  # a page's first slot opens it
        tables = {path: (low.clone(), high.clone()) for path in ("torch", "numba")}
        fold_reference(keys, *tables["torch"], torch.tensor(newest), page_size)
        numba_cpu.fold_page_bounds(keys, *tables["numba"], torch.tensor(newest), page_size)
        assert all(torch.equal(a, c) for a, c in zip(tables["torch"], tables["numba"]))


@pytest.mark.parametrize("b,hkv,g,d,slots,r,upto", [(1, 3, 3, 64, 8100, 2, 8000), (2, 2, 4, 16, 61, 5, 61),
                                                    (1, 1, 1, 8, 9, 8, 3)])
def test_channel_scores_from_channel_major_keys_equal_the_reference(b, hkv, g, d, slots, r, upto):
    """SparQ's approximate scores read from its channel-major copy of K equal the row-major reference's (whose query
    is zero off the channels), a zero query included; -inf from upto on."""
    keys = torch.randn(b, hkv, slots, d, generator=_gen(4))
    keys_t = keys.transpose(2, 3).contiguous()
    for q in (torch.randn(b, hkv, g, d, generator=_gen(5)), torch.zeros(b, hkv, g, d)):
        channels = q.abs().topk(r, dim=-1, sorted=False).indices
        want = reference.scores(q, keys, torch.tensor(upto), channels)
        for got in (numba_cpu.channel_scores(q, keys_t, torch.tensor(upto), channels),
                    reference.scores(q, keys_t.mT, torch.tensor(upto), channels),
                    kernels.slot_scores(q, keys_t.mT, torch.tensor(upto), channels, backend="auto")):
            assert torch.isinf(got[..., upto:]).all() and (got[..., upto:] < 0).all()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparq_fold_equals_the_reference():
    """The newest slot's key lands in its column of SparQ's copy of K and its value in the running sum, exactly as the
    torch fold puts them; the other columns stay."""
    from rocketkv.core.methods.sparq import fold_reference
    keys, values = torch.randn(2, 3, 50, 16, generator=_gen(6)), torch.randn(2, 3, 50, 16, generator=_gen(7))
    start = (torch.randn(2, 3, 16, 64, generator=_gen(8)), torch.randn(2, 3, 16, generator=_gen(9)))
    for newest in (1, 17, 50):
        want, got = [t.clone() for t in start], [t.clone() for t in start]
        fold_reference(keys, values, *want, torch.tensor(newest))
        numba_cpu.fold_sparq_slot(keys, values, *got, torch.tensor(newest))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(got[0][..., newest - 1], keys[:, :, newest - 1])
