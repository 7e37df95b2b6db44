"""Each method against a plain, obviously-correct float64 reference written here (loops over heads, explicit
formulas), on random post-RoPE K/V and random queries, driven through the method hooks directly.

Selections are compared tie-aware: max-pooling (SnapKV, RocketKV stage 1) and page-level scores (RocketKV stage 2)
produce exact ties, and top-k among tied values is implementation-defined.  The library's set must contain every
token strictly above the k-th reference score and only tokens at or above it, and have exactly k elements.
Outputs are recomputed in float64 from the library's (validated) selection and compared with atol 1e-5.
"""
import importlib
import math

import pytest
import torch

from rocketkv.core.cache import CompressedLayer
from rocketkv.core.methods import METHODS, make_method
from rocketkv.core.methods import ops
from rocketkv.core.methods.ops import attend_indices as _attend_indices
from rocketkv.core.state import GenerationState
from conftest import stored

# (B, Hkv, g, d): g = 1 (MHA) and g > 1 (GQA), odd head dims too
SHAPES = [(1, 2, 4, 32), (2, 3, 1, 16), (1, 1, 3, 8), (2, 2, 2, 12)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_layer(method, b, hkv, g, d, n, seed=0, plan=None, max_new=16):
    gen = _gen(seed)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    state = GenerationState(method, max_new, None)
    state.plan = plan if plan is not None else method.plan(n, max_new, d, None, g)
    state.prompt_len, state.group_size = n, g
    layer = CompressedLayer(state, 0)
    layer.update(k, v)
    state.layers = [layer]
    return layer, k, v


def grow_cache(layer, K, V, extra_k, extra_v, steps):
    """Step 0 is the cache as built; each later step appends the next extra token, as decoding does.
    Yields (step, stored slots, the whole cache's K and V in float64)."""
    for step in range(steps):
        if step:
            layer.update(extra_k[:, :, step - 1: step], extra_v[:, :, step - 1: step])
        yield (step, layer.stored, torch.cat([K, extra_k[:, :, :step]], dim=2).double(),
               torch.cat([V, extra_v[:, :, :step]], dim=2).double())


def as_upto(n):
    """A decode step's slot count, as the session passes it: a device scalar."""
    return torch.tensor(n)


def spy_indices(monkeypatch, method_name):
    """Record the slot indices a method's decode hands to ``attend_indices`` (in the module defining its decode:
    RocketKV's is HSA's)."""
    seen = []
    mod = importlib.import_module(METHODS[method_name].decode.__module__)

    def spy(layer, q, idx, scaling, backend="auto", **kwargs):
        seen.append(idx.clone())
        return _attend_indices(layer, q, idx, scaling, backend, **kwargs)

    monkeypatch.setattr(mod, "attend_indices", spy)
    return seen


def check_topk_set(lib, scores, k, rel=1e-5):
    """``lib``: set of indices chosen; ``scores``: 1-D float64 reference scores; top ``k`` (k <= len)."""
    k = min(k, scores.numel())
    kth = scores.sort(descending=True).values[k - 1].item()
    tol = rel * max(1.0, abs(kth))
    strict = set(torch.nonzero(scores > kth + tol).flatten().tolist())
    loose = set(torch.nonzero(scores >= kth - tol).flatten().tolist())
    assert len(lib) == k, (len(lib), k)
    assert strict <= lib, sorted(strict - lib)
    assert lib <= loose, sorted(lib - loose)


def ref_attend(q, keys, values, scale):
    """q [d], keys/values [n, d] float64 -> [d]."""
    w = torch.softmax((keys @ q) * scale, dim=0)
    return w @ values


def ref_maxpool(x, kernel):
    h = kernel // 2
    return torch.stack([x[max(0, j - h): j + h + 1].max() for j in range(x.numel())])


def ref_window_scores(qh, keys, split, w, scale):
    """qh [L, d] of one query head, keys [L, d]; summed causal softmax of window queries -> [split - w]."""
    acc = torch.zeros(split, dtype=torch.float64)
    for i in range(split - w, split):
        logits = (keys[: i + 1] @ qh[i]) * scale
        acc[: i + 1] += torch.softmax(logits, dim=0)
    return acc[: split - w]


# ====================================================================== topk
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,budget", [(97, 16), (131, 40), (33, 64)])
def test_topk_reference(monkeypatch, shape, n, budget):
    b, hkv, g, d = shape
    m = make_method("topk", budget, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=n + budget)
    q = torch.randn(b, hkv, g, d, generator=_gen(1))
    seen = spy_indices(monkeypatch, "topk")
    scale = d ** -0.5
    m.index(layer, layer.state.plan)
    out, cost = m.decode(layer, q, as_upto(n), layer.state.plan, scale)
    idx = seen[-1]
    assert idx.shape[2] == g  # one set per query head
    K64, V64, q64 = K.double(), V.double(), q.double()
    for bi in range(b):
        for kh in range(hkv):
            for h in range(g):
                scores = K64[bi, kh] @ q64[bi, kh, h]
                lib = set(idx[bi, kh, h][idx[bi, kh, h] >= 0].tolist())
                check_topk_set(lib, scores, budget)
                sel = sorted(lib)
                ref = ref_attend(q64[bi, kh, h], K64[bi, kh, sel], V64[bi, kh, sel], scale)
                torch.testing.assert_close(out[bi, kh, h].double(), ref, atol=1e-5, rtol=1e-5)
    assert cost.attended == min(budget, n)


# ====================================================================== snapkv
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("selection", ["head", "group"])
@pytest.mark.parametrize("n,budget,window", [(101, None, 32), (77, None, 8), (160, None, 32)])
def test_snapkv_reference(monkeypatch, shape, selection, n, budget, window):
    b, hkv, g, d = shape
    split = n - 1  # the last prompt token is decoded, eviction runs over prompt[:-1]
    per_set = window + 11 if selection == "group" else window + 9
    budget = per_set * (g if selection == "head" else 1)
    m = make_method("snapkv", budget, window=window, selection=selection, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=n * 7 + g)
    assert layer.state.plan["prompt_budget"] == per_set
    q_prompt = torch.randn(b, hkv, g, n, d, generator=_gen(3))
    scale = d ** -0.5
    # compress receives the last n >= window queries of the prefill of [0, split) (Method.compress contract)
    m.compress(layer, q_prompt[..., split - window - 3: split, :], split, layer.state.plan, scale)
    n_prefix = per_set - window
    K64, V64, Q64 = K.double(), V.double(), q_prompt.double()
    tail = list(range(split - window, n))
    for bi in range(b):
        for kh in range(hkv):
            all_pos = stored(layer, "positions")[bi, kh].tolist()
            # stored keys/values are the original rows at those positions
            torch.testing.assert_close(stored(layer, "keys")[bi, kh], K[bi, kh, all_pos])
            torch.testing.assert_close(stored(layer, "values")[bi, kh], V[bi, kh, all_pos])
            if layer.visible is None:
                pos = all_pos
            else:  # a KV head whose union is smaller than another's is padded with slots no head sees
                pos = [p for p, ok in zip(all_pos, stored(layer, "visible")[bi, kh].any(0).tolist()) if ok]
                vis = stored(layer, "visible")[bi, kh]
                assert not vis[:, [i for i, p in enumerate(all_pos) if p not in pos]].any()
            assert pos == sorted(pos) and len(set(pos)) == len(pos)
            per_head = [ref_window_scores(Q64[bi, kh, h], K64[bi, kh], split, window, scale) for h in range(g)]
            if selection == "group":
                assert layer.visible is None
                pooled = ref_maxpool(sum(per_head), 7)
                lib = set(p for p in pos if p < split - window)
                check_topk_set(lib, pooled, n_prefix)
                assert [p for p in pos if p >= split - window] == tail
                assert len(pos) == per_set + 1
            else:
                union = set()
                for h in range(g):
                    seen_h = [p for p, ok in zip(all_pos, vis[h].tolist()) if ok]
                    lib = set(p for p in seen_h if p < split - window)
                    check_topk_set(lib, ref_maxpool(per_head[h], 7), n_prefix)
                    assert [p for p in seen_h if p >= split - window] == tail
                    union |= lib
                assert set(p for p in pos if p < split - window) == union  # stored once per KV head: the union
    # decode over the compressed cache is dense over what each head may see
    q = torch.randn(b, hkv, g, d, generator=_gen(5))
    m.index(layer, layer.state.plan)
    out, _ = m.decode(layer, q, as_upto(layer.stored), layer.state.plan, scale)
    for bi in range(b):
        for kh in range(hkv):
            for h in range(g):
                ok = torch.ones(layer.stored, dtype=torch.bool) if layer.visible is None else \
                    stored(layer, "visible")[bi, kh, h]
                pos = stored(layer, "positions")[bi, kh][ok]
                ref = ref_attend(q.double()[bi, kh, h], K64[bi, kh, pos], V64[bi, kh, pos], scale)
                torch.testing.assert_close(out[bi, kh, h].double(), ref, atol=1e-5, rtol=1e-5)


def test_snapkv_short_prompt_keeps_everything():
    m = make_method("snapkv", 64, selection="group", kernels="torch")
    layer, K, _ = make_layer(m, 1, 2, 2, 16, 60)
    m.compress(layer, torch.randn(1, 2, 2, 59, 16), 59, layer.state.plan, 0.25)
    assert layer.stored == 60 and stored(layer, "positions")[0, 0].tolist() == list(range(60))


# ====================================================================== quest
def ref_pages(keys, upto, p):
    """keys [n, d] -> (mins, maxs) [P, d] over slots [0, upto)."""
    n_pages = math.ceil(upto / p)
    mins = torch.stack([keys[i * p: min(upto, (i + 1) * p)].min(0).values for i in range(n_pages)])
    maxs = torch.stack([keys[i * p: min(upto, (i + 1) * p)].max(0).values for i in range(n_pages)])
    return mins, maxs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,plan", [(97, {"page_size": 4, "topk": 24}), (131, {"page_size": 3, "topk": 40}),
                                    (50, {"page_size": 7, "topk": 7}), (64, {"page_size": 1, "topk": 10}),
                                    (20, {"page_size": 5, "topk": 500})])
def test_quest_reference(monkeypatch, shape, n, plan):
    b, hkv, g, d = shape
    m = make_method("quest", 256, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=n + g, plan=plan)
    seen = spy_indices(monkeypatch, "quest")
    scale = d ** -0.5
    p = plan["page_size"]
    n_sel = plan["topk"] // p
    # grow the cache a few tokens at a time: metadata must follow (last page filled, then new pages)
    extra_k = torch.randn(b, hkv, 5, d, generator=_gen(9))
    extra_v = torch.randn(b, hkv, 5, d, generator=_gen(10))
    for step, upto, K64, V64 in grow_cache(layer, K, V, extra_k, extra_v, steps=4):
        q = torch.randn(b, hkv, g, d, generator=_gen(20 + step))
        q64 = q.double()
        m.index(layer, plan) if step == 0 else m.index(layer, plan, as_upto(upto))
        out, _ = m.decode(layer, q, as_upto(upto), plan, scale)
        idx = seen[-1]
        assert idx.shape[2] == 1  # one selection per KV group
        for bi in range(b):
            for kh in range(hkv):
                mins, maxs = ref_pages(K64[bi, kh], upto, p)
                group_bound = torch.zeros(mins.shape[0], dtype=torch.float64)
                for h in range(g):
                    qh = q64[bi, kh, h]
                    group_bound += torch.maximum(qh * mins, qh * maxs).sum(-1)
                lib_slots = set(idx[bi, kh, 0][idx[bi, kh, 0] >= 0].tolist())
                assert all(s < upto for s in lib_slots)
                lib_pages = set(s // p for s in lib_slots)
                # whole pages: every slot of a chosen page below upto is attended
                assert lib_slots == set(s for pg in lib_pages for s in range(pg * p, min(upto, pg * p + p)))
                check_topk_set(lib_pages, group_bound, n_sel)
                sel = sorted(lib_slots)
                for h in range(g):
                    ref = ref_attend(q64[bi, kh, h], K64[bi, kh, sel], V64[bi, kh, sel], scale)
                    torch.testing.assert_close(out[bi, kh, h].double(), ref, atol=1e-5, rtol=1e-5)


# ====================================================================== sparq
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,plan", [(97, {"channels": 3, "topk": 20}), (131, {"channels": 1, "topk": 9}),
                                    (45, {"channels": 7, "topk": 60}), (64, {"channels": 5, "topk": 63})])
def test_sparq_reference(monkeypatch, shape, n, plan):
    """Per head: the top-r |q| channels score every slot over SparQ's temperature, the top k slots are attended
    exactly, and mean(V) over every stored slot (kept as a running sum as slots arrive) takes the rest of the mass."""
    b, hkv, g, d = shape
    plan = {**plan, "channels": min(plan["channels"], d)}
    m = make_method("sparq", 256, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=3 * n + d, plan=plan)
    seen = spy_indices(monkeypatch, "sparq")
    scale = d ** -0.5
    extra_k = torch.randn(b, hkv, 3, d, generator=_gen(n + 1))
    extra_v = torch.randn(b, hkv, 3, d, generator=_gen(n + 2))
    for step, upto, K64, V64 in grow_cache(layer, K, V, extra_k, extra_v, steps=3):
        q = torch.randn(b, hkv, g, d, generator=_gen(n + 10 * step))
        m.index(layer, plan, n) if step == 0 else m.index(layer, plan, as_upto(upto))
        out, _ = m.decode(layer, q, as_upto(upto), plan, scale)
        check_sparq_step(out, seen[-1], q.double(), K64, V64, plan, scale)


def check_sparq_step(out, idx, q64, K64, V64, plan, scale):
    b, hkv, g, d = q64.shape
    r, k = plan["channels"], plan["topk"]
    for bi in range(b):
        for kh in range(hkv):
            for h in range(g):
                qh = q64[bi, kh, h]
                chans = qh.abs().topk(r).indices
                temp = math.sqrt(d * qh[chans].abs().sum().item() / qh.abs().sum().item())
                approx = torch.softmax((K64[bi, kh][:, chans] @ qh[chans]) / temp, dim=0)
                lib = set(idx[bi, kh, h][idx[bi, kh, h] >= 0].tolist())
                check_topk_set(lib, approx, k)
                sel = sorted(lib)
                y_k = ref_attend(qh, K64[bi, kh, sel], V64[bi, kh, sel], scale)
                alpha = approx[sel].sum()
                ref = alpha * y_k + (1 - alpha) * V64[bi, kh].mean(0)
                torch.testing.assert_close(out[bi, kh, h].double(), ref, atol=1e-5, rtol=1e-5)


# ====================================================================== rocketkv
def ref_rocketkv_stage2(q64g, K64, upto, p, r, k, d):
    """One KV group: q64g [g, d], K64 [n, d] -> averaged approximate probabilities [upto]."""
    group_q = q64g.sum(0)
    signs = torch.where(group_q > 0, 1.0, -1.0).double()  # 0 -> -1
    chans = q64g.abs().sum(0).topk(r).indices
    mins, maxs = ref_pages(K64, upto, p)
    probs = torch.zeros(upto, dtype=torch.float64)
    for h in range(q64g.shape[0]):
        qh = q64g[h]
        page_logit = torch.zeros(mins.shape[0], dtype=torch.float64)
        for j in chans.tolist():
            page_logit += qh[j] * (maxs[:, j] if signs[j] > 0 else mins[:, j])
        token_logit = page_logit.repeat_interleave(p)[:upto]
        temp = math.sqrt(d * qh[chans].abs().sum().item() / qh.abs().sum().item())
        probs += torch.softmax(token_logit / temp, dim=0)
    return probs / q64g.shape[0]


def check_stage2_step(out, idx, q64, K64, V64, upto, plan, scale):
    """One stage-2 decode step against the float64 reference: each KV group's selection is a top-k set of the
    reference's page-broadcast probabilities, and each head's output is exact attention over that set."""
    b, hkv, g, d = out.shape
    for bi in range(b):
        for kh in range(hkv):
            probs = ref_rocketkv_stage2(q64[bi, kh], K64[bi, kh], upto, plan["page_size"], plan["channels"],
                                        plan["topk"], d)
            lib = set(idx[bi, kh, 0][idx[bi, kh, 0] >= 0].tolist())
            check_topk_set(lib, probs, plan["topk"])
            sel = sorted(lib)
            for h in range(g):
                ref = ref_attend(q64[bi, kh, h], K64[bi, kh, sel], V64[bi, kh, sel], scale)
                torch.testing.assert_close(out[bi, kh, h].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,plan", [(97, {"page_size": 3, "channels": 5, "topk": 21}),
                                    (131, {"page_size": 1, "channels": 2, "topk": 16}),
                                    (50, {"page_size": 4, "channels": 8, "topk": 30}),
                                    (40, {"page_size": 2, "channels": 3, "topk": 100})])
def test_rocketkv_stage2_reference(monkeypatch, shape, n, plan):
    b, hkv, g, d = shape
    plan = {**plan, "channels": min(plan["channels"], d), "prompt_budget": 10 ** 6, "capacity": 10 ** 6}
    m = make_method("rocketkv", 256, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=n + d, plan=plan)
    seen = spy_indices(monkeypatch, "rocketkv")
    scale = d ** -0.5
    extra_k = torch.randn(b, hkv, 4, d, generator=_gen(11))
    extra_v = torch.randn(b, hkv, 4, d, generator=_gen(12))
    for step, upto, K64, V64 in grow_cache(layer, K, V, extra_k, extra_v, steps=3):
        q = torch.randn(b, hkv, g, d, generator=_gen(40 + step))
        if g > 1 and step == 1:
            q[:, :, 1, ::2] = -q[:, :, 0, ::2]  # channel sums of exactly 0 (sign -> -1, the min) when g == 2
            if g > 2:
                q[:, :, 2:, ::2] = 0
        q64 = q.double()
        m.index(layer, plan) if step == 0 else m.index(layer, plan, as_upto(upto))
        out, _ = m.decode(layer, q, as_upto(upto), plan, scale)
        idx = seen[-1]
        assert idx.shape[2] == 1  # one selection per KV group
        check_stage2_step(out, idx, q64, K64, V64, upto, plan, scale)


def test_rocketkv_zero_sign_uses_min(monkeypatch):
    """Σ_heads q_j = 0 must count as negative: the page bound uses the min key on that channel."""
    d, n = 4, 8
    m = make_method("rocketkv", 256, kernels="torch")
    plan = {"page_size": 2, "channels": 1, "topk": 2, "prompt_budget": 100, "capacity": 100}
    layer, _, _ = make_layer(m, 1, 1, 2, d, n, plan=plan)
    keys = torch.zeros(1, 1, n, d)
    keys[0, 0, :, 0] = torch.tensor([5.0, -5.0, 1.0, 0.5, -1.0, -0.5, 2.0, 3.0])
    layer.keys[:, :, :n].copy_(keys)
    q = torch.zeros(1, 1, 2, d)
    q[0, 0, 0, 0], q[0, 0, 1, 0] = 1.0, -1.0  # channel 0: sum 0 -> sign -1 -> min row
    q[0, 0, :, 1] = 0.01  # keeps ‖q‖₁ > ‖q_I‖₁ irrelevant; channel 0 is still the top |q| channel
    seen = spy_indices(monkeypatch, "rocketkv")
    m.index(layer, plan)
    m.decode(layer, q, as_upto(n), plan, 1.0)
    # page mins on channel 0: [-5, 0.5, -1, 2]; head 0 logits = mins, head 1 = -mins -> mean of softmaxes.
    mins = torch.tensor([-5.0, 0.5, -1.0, 2.0], dtype=torch.float64)
    tau = math.sqrt(d * 1.0 / 1.02)
    probs = (torch.softmax(mins.repeat_interleave(2) / tau, 0) + torch.softmax(-mins.repeat_interleave(2) / tau, 0)) / 2
    lib = set(seen[-1][0, 0, 0].tolist())
    check_topk_set(lib, probs, 2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,keep,window", [(101, 50, 32), (140, 45, 32), (71, 20, 8), (60, 59, 32), (60, 80, 32)])
def test_rocketkv_stage1_reference(shape, n, keep, window):
    b, hkv, g, d = shape
    split = n - 1
    m = make_method("rocketkv", 256, window=window, kernels="torch")
    plan = {"prompt_budget": keep, "page_size": 2, "channels": 2, "topk": 8, "capacity": keep + 16, "kernel_size": 63}
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=n + keep, plan=plan)
    q_prompt = torch.randn(b, hkv, g, n, d, generator=_gen(7))
    scale = d ** -0.5
    m.compress(layer, q_prompt[..., :split, :], split, plan, scale)
    if split <= keep:
        assert layer.stored == n and stored(layer, "positions")[0, 0].tolist() == list(range(n))
        return
    assert layer.stored == keep + 1  # P prompt tokens + the last prompt token (decoded next)
    assert layer.visible is None
    K64, Q64 = K.double(), q_prompt.double()
    for bi in range(b):
        for kh in range(hkv):
            pos = stored(layer, "positions")[bi, kh].tolist()
            assert pos == sorted(pos)
            torch.testing.assert_close(stored(layer, "keys")[bi, kh], K[bi, kh, pos])
            torch.testing.assert_close(stored(layer, "values")[bi, kh], V[bi, kh, pos])
            scores = sum(ref_window_scores(Q64[bi, kh, h], K64[bi, kh], split, window, scale) for h in range(g))
            pooled = ref_maxpool(scores, 63)
            check_topk_set(set(p for p in pos if p < split - window), pooled, keep - window)
            assert [p for p in pos if p >= split - window] == list(range(split - window, n))


# ====================================================================== adaptive pooling (SnapKV++)
def top_prefix(pooled, m):
    return set(pooled.topk(m).indices.tolist())


@pytest.mark.parametrize("method,opts,budget", [("rocketkv", {}, 32), ("snapkv", {"selection": "group"}, 40)])
@pytest.mark.parametrize("n,kernel,other", [(90, 3, 15), (101, 15, 3)])
def test_adaptive_kernel_is_the_tables_and_compression_pools_with_it(method, opts, budget, n, kernel, other):
    """``kernel_size=auto``: the plan takes the kernel of the table's last row the prompt length reaches, and the
    eviction pools with that kernel (checked against the reference selection with it; the other row's kernel
    selects another set here, so the check tells them apart)."""
    b, hkv, g, d, window = 1, 2, 2, 16, 8
    m = make_method(method, budget, kernel_size="auto", adaptive_kernel_sizes=[[0, 3], [100, 15]], window=window,
                    kernels="torch", **opts)
    layer, K, _ = make_layer(m, b, hkv, g, d, n, seed=n)
    plan = layer.state.plan
    assert plan["kernel_size"] == kernel
    split = n - 1
    q_prompt = torch.randn(b, hkv, g, n, d, generator=_gen(n + 1))
    m.compress(layer, q_prompt[..., :split, :], split, plan, d ** -0.5)
    m_prefix = plan["prompt_budget"] - window
    for kh in range(hkv):
        scores = sum(ref_window_scores(q_prompt.double()[0, kh, h], K.double()[0, kh], split, window, d ** -0.5)
                     for h in range(g))
        lib = set(p for p in stored(layer, "positions")[0, kh].tolist() if p < split - window)
        check_topk_set(lib, ref_maxpool(scores, kernel), m_prefix)
        assert lib != top_prefix(ref_maxpool(scores, other), m_prefix)


# ====================================================================== hsa
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,budget", [(97, 16), (131, 24), (50, 40)])
def test_hsa_reference(monkeypatch, shape, n, budget):
    """HSA keeps the whole prompt and runs RocketKV's stage 2 over it, with the page size, channels and top-k its
    plan maps from the whole sequence."""
    b, hkv, g, d = shape
    max_new = 4
    m = make_method("hsa", budget, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=n + budget, max_new=max_new)
    plan = layer.state.plan
    assert plan["capacity"] == n + max_new and plan["topk"] == budget // 2 and not plan["dense"]
    m.compress(layer, torch.randn(b, hkv, g, 8, d, generator=_gen(1)), n - 1, plan, d ** -0.5)
    assert layer.stored == n  # nothing evicted
    seen = spy_indices(monkeypatch, "hsa")
    scale = d ** -0.5
    extra_k = torch.randn(b, hkv, max_new, d, generator=_gen(13))
    extra_v = torch.randn(b, hkv, max_new, d, generator=_gen(14))
    for step, upto, K64, V64 in grow_cache(layer, K, V, extra_k, extra_v, steps=3):
        q = torch.randn(b, hkv, g, d, generator=_gen(50 + step))
        q64 = q.double()
        m.index(layer, plan) if step == 0 else m.index(layer, plan, as_upto(upto))
        out, cost = m.decode(layer, q, as_upto(upto), plan, scale)
        assert float(cost.attended) == plan["topk"]
        check_stage2_step(out, seen[-1], q64, K64, V64, upto, plan, scale)


# ====================================================================== quest on a long cache
@pytest.mark.parametrize("budget", [32, 48])
def test_quest_never_attends_more_than_k_on_a_long_cache(monkeypatch, budget):
    """At S = 3016 tokens, ⌈2S/t⌉ (189 or 126) exceeds k = t/2: the page is capped at k, one whole page is
    attended, never more than k tokens, and the output is exact attention over that page."""
    b, hkv, g, d, n, max_new = 1, 2, 2, 16, 3000, 16
    k = budget // 2
    m = make_method("quest", budget, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=budget, max_new=max_new)
    plan = layer.state.plan
    assert math.ceil(2 * (n + max_new) / budget) > k
    assert plan["page_size"] == k and plan["selected_pages"] == 1 and plan["page_size_capped"]
    seen = spy_indices(monkeypatch, "quest")
    q = torch.randn(b, hkv, g, d, generator=_gen(budget + 1))
    m.index(layer, plan)
    out, cost = m.decode(layer, q, as_upto(n), plan, d ** -0.5)
    assert float(cost.attended) <= k
    idx = seen[-1]
    q64, K64, V64 = q.double(), K.double(), V.double()
    for kh in range(hkv):
        lib_slots = sorted(idx[0, kh, 0][idx[0, kh, 0] >= 0].tolist())
        assert 0 < len(lib_slots) <= k
        mins, maxs = ref_pages(K64[0, kh], n, k)
        bound = sum(torch.maximum(q64[0, kh, h] * mins, q64[0, kh, h] * maxs).sum(-1) for h in range(g))
        best = bound.argmax().item()
        assert lib_slots == list(range(best * k, min(n, best * k + k)))
        for h in range(g):
            ref = ref_attend(q64[0, kh, h], K64[0, kh, lib_slots], V64[0, kh, lib_slots], d ** -0.5)
            torch.testing.assert_close(out[0, kh, h].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["topk", "quest", "sparq", "rocketkv", "hsa"])
def test_sparse_methods_exact_when_everything_fits(method):
    """With k >= stored tokens every method is exact attention (SparQ: α = 1, no mean reallocation)."""
    b, hkv, g, d, n = 1, 2, 4, 16, 40
    m = make_method(method, 1024, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n)
    q = torch.randn(b, hkv, g, d, generator=_gen(2))
    m.index(layer, layer.state.plan)
    out, _ = m.decode(layer, q, as_upto(n), layer.state.plan, d ** -0.5)
    for kh in range(hkv):
        for h in range(g):
            ref = ref_attend(q.double()[0, kh, h], K.double()[0, kh], V.double()[0, kh], d ** -0.5)
            torch.testing.assert_close(out[0, kh, h].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,plan", [
    ("quest", {"page_size": 4, "topk": 4}),
    ("rocketkv", {"page_size": 4, "channels": 4, "topk": 4, "prompt_budget": 100, "capacity": 100}),
    ("hsa", {"page_size": 4, "channels": 4, "topk": 4, "capacity": 100}),
])
def test_page_metadata_ignores_slots_beyond_upto(monkeypatch, method, plan):
    """``decode(layer, q, upto)`` attends over slots ``[0, upto)`` (Method.decode contract); the session uses
    ``upto < stored`` for every token but the last of a multi-token step.  The page bounds must then describe only
    slots ``< upto``: a later token's key must not change what an earlier token selects (causality).

    Here slots 0..15 are 4 pages; a 3-token step appends slots 16, 17, 18, which share page 4.  Slot 18 has a huge
    key, so a page-4 bound computed over all stored slots dominates and wrongly pulls page 4 into token 16's
    selection, evicting a page it would have chosen from slots [0, 17) alone.
    """
    b, hkv, g, d = 1, 1, 2, 4
    m = make_method(method, 256, kernels="torch")
    layer, _, _ = make_layer(m, b, hkv, g, d, 16, seed=0, plan=plan)
    with torch.no_grad():
        layer.keys[0, 0, :16].copy_(torch.randn(16, d, generator=_gen(1)))
        layer.keys[0, 0, 4:8] += 3.0  # page 1 clearly best among the prompt pages for q > 0
    q = torch.ones(b, hkv, g, d)
    seen = spy_indices(monkeypatch, method)
    new_k = torch.zeros(b, hkv, 3, d)
    new_k[0, 0, 2] = 1000.0  # slot 18: a future key, huge
    new_v = torch.randn(b, hkv, 3, d, generator=_gen(2))

    # one by one, as the session runs it: pages of the prompt built, token 16 appended, folded in, decoded
    ref_layer, _, _ = make_layer(m, b, hkv, g, d, 16, seed=0, plan=plan)
    with torch.no_grad():
        ref_layer.keys.copy_(layer.keys)
        ref_layer.values.copy_(layer.values)
    m.index(ref_layer, plan, 16)
    ref_layer.update(new_k[:, :, :1], new_v[:, :, :1])
    m.index(ref_layer, plan, as_upto(17))
    ref_out, _ = m.decode(ref_layer, q, as_upto(17), plan, d ** -0.5)
    ref_sel = set(seen[-1][0, 0, 0][seen[-1][0, 0, 0] >= 0].tolist())

    # three at once, as the session's multi-token step does: token 16 sees slots [0, 17) only
    m.index(layer, plan, 16)
    layer.update(new_k, new_v)
    m.index(layer, plan, as_upto(17))
    out, _ = m.decode(layer, q, as_upto(17), plan, d ** -0.5)
    sel = set(seen[-1][0, 0, 0][seen[-1][0, 0, 0] >= 0].tolist())
    assert sel == ref_sel
    torch.testing.assert_close(out, ref_out)


# ====================================================================== dense plans
def covering_budget(name, n, max_new, g):
    """The smallest budget at which the method keeps and attends to every slot of an ``n + max_new`` sequence."""
    total = n + max_new
    return {"topk": total, "sparq": 2 * total, "quest": 2 * total, "snapkv": g * n,
            "rocketkv": 2 * total, "hsa": 2 * total}[name]


@pytest.mark.parametrize("name", ["topk", "sparq", "quest", "snapkv", "rocketkv", "hsa"])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_dense_plan_means_the_method_attends_everything(name, shape):
    """A plan marked dense runs as full KV in the session; here the method's own hooks at that plan must
    compute the same attention as dense attention, and one token less of budget must not be marked dense."""
    b, hkv, g, d = shape
    n, max_new = 61, 8
    budget = covering_budget(name, n, max_new, g)
    m = make_method(name, budget, kernels="torch", window=4)
    assert m.plan(n, max_new, d, None, g)["dense"]
    assert not make_method(name, budget - 1, window=4).plan(n, max_new, d, None, g)["dense"]
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=7, max_new=max_new)
    m.compress(layer, torch.randn(b, hkv, g, 8, d, generator=_gen(8)), n, layer.state.plan, d ** -0.5)
    assert layer.stored == n and layer.visible is None  # nothing evicted
    extra_k = torch.randn(b, hkv, max_new, d, generator=_gen(9))
    extra_v = torch.randn(b, hkv, max_new, d, generator=_gen(10))
    for step, upto, K64, V64 in grow_cache(layer, K, V, extra_k, extra_v, max_new):
        q = torch.randn(b, hkv, g, d, generator=_gen(11 + step))
        m.index(layer, layer.state.plan, upto if step == 0 else as_upto(upto))
        out, cost = m.decode(layer, q, as_upto(upto), layer.state.plan, d ** -0.5)
        assert float(cost.attended) == upto
        for bi in range(b):
            for h in range(hkv):
                for j in range(g):
                    ref = ref_attend(q[bi, h, j].double(), K64[bi, h], V64[bi, h], d ** -0.5)
                    torch.testing.assert_close(out[bi, h, j].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,budget", [("topk", 24), ("sparq", 24), ("quest", 24), ("rocketkv", 24), ("snapkv", 64),
                                         ("hsa", 24), ("quest", 16)])
def test_a_decode_step_reads_nothing_back_to_the_host(monkeypatch, name, budget):
    """On a GPU a host read (``.item()``, ``bool(tensor)``, ...) stalls the stream every layer; a decode step's
    selection, attention and statistics must stay on the device."""
    decode_without_host_reads(monkeypatch, make_method(name, budget, kernels="torch", window=4))


def decode_without_host_reads(monkeypatch, m, b=1, hkv=2, g=4, d=16, n=97) -> dict:
    """One decode step (index, decode, statistics) of ``m`` on a compressed random layer, with every read of a
    tensor back to the host an error; returns the plan."""
    layer, _, _ = make_layer(m, b, hkv, g, d, n, seed=3)
    plan = layer.state.plan
    assert not plan["dense"]
    m.compress(layer, torch.randn(b, hkv, g, 8, d, generator=_gen(4)), n, plan, d ** -0.5)
    m.index(layer, plan, layer.stored)  # at the prefill's end, where host reads are fine
    layer.update(torch.randn(b, hkv, 1, d, generator=_gen(5)), torch.randn(b, hkv, 1, d, generator=_gen(6)))
    upto = as_upto(layer.stored)

    def host_read(*args, **kwargs):
        raise AssertionError("a decode step read a tensor back to the host")

    with monkeypatch.context() as patch:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, attr, host_read)
        m.index(layer, plan, upto)
        out, cost = m.decode(layer, torch.randn(b, hkv, g, d, generator=_gen(7)), upto, plan, d ** -0.5)
        layer.state.stats.record(layer, layer.stored, cost)
    assert out.shape == (b, hkv, g, d) and 0 < float(cost.attended) <= layer.stored
    return plan
    assert layer.state.summary()["attended_tokens"] == float(cost.attended)


# ====================================================================== attending selected slots
@pytest.mark.parametrize("rows_share_a_set", [True, False])
@pytest.mark.parametrize("k", [4, 40])  # a gather of the selected rows; all slots under a selection mask
def test_attend_indices_equals_each_rows_own_softmax(rows_share_a_set, k):
    """``attend_indices`` gathers small selections and masks large ones; either way each query row gets exact
    softmax attention over its own selected slots (pads -1 ignored)."""
    b, hkv, rows, d, slots = 2, 3, 4, 16, 300
    gen = _gen(21)
    m = make_method("topk", 64, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, 1, d, slots, seed=22)
    q = torch.randn(b, hkv, rows, d, generator=gen)
    idx = torch.stack([torch.randperm(slots, generator=gen)[:k] for _ in range(b * hkv * (1 if rows_share_a_set
                                                                                            else rows))])
    idx = idx.view(b, hkv, 1 if rows_share_a_set else rows, k)
    idx[..., -2:] = -1  # pads
    masked = k * ops.MASKED_ATTENTION_FRACTION >= layer.capacity
    assert masked == (k == 40)  # both paths are exercised
    out = _attend_indices(layer, q, idx, d ** -0.5)
    for bi in range(b):
        for kh in range(hkv):
            for r in range(rows):
                sel = idx[bi, kh, 0 if rows_share_a_set else r]
                sel = sel[sel >= 0]
                ref = ref_attend(q[bi, kh, r].double(), K[bi, kh, sel].double(), V[bi, kh, sel].double(), d ** -0.5)
                torch.testing.assert_close(out[bi, kh, r].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto: the numba fold where numba imports
def test_sparq_keeps_a_channel_major_copy_of_every_stored_key(backend):
    """SparQ's metadata: K again, channel-major, built at ``index`` and extended by one column per decode step (also
    when the eager buffers grow); its bytes are the stored slots' K plus the running V sum."""
    b, hkv, g, d, slots = 2, 2, 3, 16, 40
    m = make_method("sparq", 64, kernels=backend)
    layer, _, _ = make_layer(m, b, hkv, g, d, slots, seed=3)
    plan = m.plan(slots, 8, d)
    m.index(layer, plan, slots)
    assert torch.equal(layer.meta["keys_t"][..., :slots], layer.keys[:, :, :slots].transpose(2, 3))
    gen = torch.Generator().manual_seed(4)
    for _ in range(3 * layer.capacity):  # past the capacity: the buffers grow
        k, v = torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen)
        layer.update(k, v)
        m.index(layer, plan, torch.tensor(layer.stored))
    n = layer.stored
    assert n > slots and layer.meta["keys_t"].shape[-1] >= n
    assert torch.equal(layer.meta["keys_t"][..., :n], layer.keys[:, :, :n].transpose(2, 3))
    torch.testing.assert_close(layer.meta["value_sum"], layer.values[:, :, :n].sum(2))
    assert m.metadata_bytes(layer, plan) == (b * hkv * d * n + b * hkv * d) * 4
