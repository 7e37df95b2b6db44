"""StreamingLLM, DuoAttention, PyramidKV and Ada-KV against plain float64 references written here (loops over heads,
explicit formulas) on random post-RoPE K/V, through the method hooks: the kept positions exactly (ties go to the
lower position, then the lower head, in the library and here alike), each decode step's output over exactly the
tokens the method says it attends; then end to end on a tiny model: a plan that keeps everything gives stock
``generate``'s tokens, eviction decodes exactly over what is kept, and the budget mappings are the papers'."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import peaky_model, stored
from rocketkv.core import compress, make_method
from rocketkv.core.methods.pyramidkv import pyramid_budgets
from test_cache import PROMPT_LEN, assert_equals_masked_full_attention, prompt, run
from test_methods_reference import (_gen, as_upto, decode_without_host_reads, make_layer, ref_attend, ref_maxpool,
                                    ref_window_scores)

SHAPES = [(1, 2, 4, 16), (2, 3, 1, 8), (1, 4, 2, 12)]


def ref_top(scores, k):
    """Indices of the k best of 1-D float64 ``scores``, ties to the lower index (the library's rule)."""
    return sorted(sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))[:k])


def pattern_file(tmp_path, scores, name="full_attention_heads.tsv"):
    path = tmp_path / name
    path.write_text("\n".join("\t".join(f"{x:.6f}" for x in row) for row in scores) + "\n")
    return path


def decode_steps(m, layer, K, V, steps, expected_positions, seed=11):
    """Append ``steps`` random tokens one at a time, decode each, and compare with float64 attention over the
    positions ``expected_positions(b, kv_head, query_head, upto)`` returns (original positions)."""
    b, hkv, _, d = K.shape
    g = layer.state.group_size
    K64, V64 = K.double(), V.double()
    plan = layer.state.plan
    for step in range(steps):
        k_new = torch.randn(b, hkv, 1, d, generator=_gen(seed + 2 * step))
        v_new = torch.randn(b, hkv, 1, d, generator=_gen(seed + 2 * step + 1))
        layer.update(k_new, v_new)
        K64, V64 = torch.cat([K64, k_new.double()], 2), torch.cat([V64, v_new.double()], 2)
        upto = layer.stored
        m.index(layer, plan, as_upto(upto))
        q = torch.randn(b, hkv, g, d, generator=_gen(seed + 100 + step))
        out, cost = m.decode(layer, q, as_upto(upto), plan, d ** -0.5)
        counts = []
        for bi in range(b):
            for kh in range(hkv):
                for h in range(g):
                    pos = expected_positions(bi, kh, h, upto)
                    counts.append(len(pos))
                    ref = ref_attend(q.double()[bi, kh, h], K64[bi, kh, pos], V64[bi, kh, pos], d ** -0.5)
                    torch.testing.assert_close(out[bi, kh, h].double(), ref, atol=1e-5, rtol=1e-5)
        assert float(cost.attended) == pytest.approx(sum(counts) / len(counts))


# ====================================================================== StreamingLLM
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,budget,sink", [(97, 24, 4), (60, 40, 0), (30, 40, 4)])
def test_streamingllm_reference(shape, n, budget, sink):
    b, hkv, g, d = shape
    m = make_method("streamingllm", budget, sink=sink, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=n)
    layer.state.group_size = g
    plan = layer.state.plan
    assert (plan["sink"], plan["recent"]) == (sink, budget - sink)
    m.compress(layer, torch.randn(b, hkv, g, 8, d), n, plan, d ** -0.5)
    recent = budget - sink
    kept = list(range(n)) if n <= budget else list(range(sink)) + list(range(n - recent, n))
    assert stored(layer, "positions").tolist() == [[kept] * hkv] * b
    m.index(layer, plan, layer.stored)
    slot_pos = kept  # slot -> position; every new token is appended in order

    def expected(bi, kh, h, upto):
        positions = slot_pos + list(range(n, n + upto - len(slot_pos)))
        return [positions[s] for s in range(upto) if s < sink or s >= upto - recent]

    decode_steps(m, layer, K, V, 12, expected)
    assert layer.stored == len(kept) + 12  # stored grows by the decode steps, attended never past the budget


def test_streamingllm_budget_must_exceed_the_sinks():
    with pytest.raises(ValueError, match="budget=16 must exceed sink=16"):
        make_method("streamingllm", 16, sink=16).plan(100, 8, 16)
    assert make_method("streamingllm", 108).plan(100, 8, 16)["dense"]
    assert not make_method("streamingllm", 107).plan(100, 8, 16)["dense"]


# ====================================================================== DuoAttention
def test_duoattention_budget_mapping(tmp_path):
    scores = torch.rand(4, 2, generator=_gen(0)).tolist()  # 8 heads
    path = pattern_file(tmp_path, scores)
    def plan(t, n=16000, new=128):
        return make_method("duoattention", t, pattern_file=str(path)).plan(n, new, 128)

    # t > 640: streaming heads 128 + 512, retrieval share so that the mean traffic is t: (t - 640) / (S - 640)
    p = plan(4096)
    assert (p["sink"], p["recent"]) == (128, 512)
    assert p["retrieval_heads"] == math.floor(8 * (4096 - 640) / (16128 - 640)) == 1
    assert plan(16128 - 1000)["retrieval_heads"] == math.floor(8 * (16128 - 1640) / (16128 - 640)) == 7
    # t <= 640: every head streams; sink 128 when t > 256, else 20% of t; the rest recent
    assert {k: plan(512)[k] for k in ("sink", "recent", "retrieval_heads")} == {"sink": 128, "recent": 384,
                                                                                "retrieval_heads": 0}
    assert {k: plan(256)[k] for k in ("sink", "recent")} == {"sink": 51, "recent": 205}
    assert {k: plan(100)[k] for k in ("sink", "recent")} == {"sink": 20, "recent": 80}
    assert plan(20000)["dense"] and plan(256, 100, 28)["dense"] and not plan(256, 100, 157)["dense"]


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("retrieval_first", [True, False])
def test_duoattention_reference(tmp_path, shape, retrieval_first):
    """Retrieval heads attend everything; streaming heads their sink and the latest window, sliding."""
    b, hkv, g, d = shape
    n, sink, recent = 120, 8, 40
    scores = [[0.9 if (h == 0) == retrieval_first else 0.1 for h in range(hkv)]]  # one layer
    path = pattern_file(tmp_path, scores)
    # the plan's count of retrieval heads set to the heads scored 0.9 (the mapping is tested above)
    m = make_method("duoattention", 600, pattern_file=str(path), sink=sink, recent=recent, kernels="torch")
    n_ret = sum(1 for s in scores[0] if s > 0.5)
    plan = {**m.plan(n, 16, d), "retrieval_heads": n_ret, "dense": False}
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=5, plan=plan)
    layer.state.group_size = g
    m.compress(layer, torch.randn(b, hkv, g, 8, d), n, plan, d ** -0.5)
    retrieval = [s > 0.5 for s in scores[0]]
    window = list(range(sink)) + list(range(n - recent, n))
    if any(retrieval):  # stored whole; streaming heads see their sink and window only
        assert stored(layer, "positions")[0, 0].tolist() == list(range(n))
        for kh in range(hkv):
            seen = [p for p, ok in enumerate(stored(layer, "visible")[0, kh, 0].tolist()) if ok]
            assert seen == (list(range(n)) if retrieval[kh] else window)
        slot_pos = list(range(n))
    else:  # every head streams: evicted to the sink and the window
        assert stored(layer, "positions")[0, 0].tolist() == window and layer.visible is None
        slot_pos = window
    m.index(layer, plan, layer.stored)

    def expected(bi, kh, h, upto):
        positions = slot_pos + list(range(n, n + upto - len(slot_pos)))
        if retrieval[kh]:
            return positions[:upto]
        return [positions[s] for s in range(upto) if s < sink or s >= upto - recent]

    decode_steps(m, layer, K, V, 6, expected)


def test_duoattention_ranks_heads_by_score(tmp_path):
    scores = [[0.2, 0.95], [0.95, 0.4], [0.1, 0.3]]  # ties: the lower layer first
    path = pattern_file(tmp_path, scores)
    m = make_method("duoattention", 600, pattern_file=str(tmp_path))  # a folder holding the file works too
    assert m._rank.tolist() == [[4, 0], [1, 2], [5, 3]]
    assert m.plan(100, 8, 16)["pattern_sha256"] and str(path).endswith("full_attention_heads.tsv")


def test_duoattention_bad_pattern_files_name_the_file_and_the_shape(tmp_path):
    with pytest.raises(ValueError, match="needs method.pattern_file"):
        make_method("duoattention", 256)
    with pytest.raises(ValueError, match="pattern_file='.*nowhere.tsv' does not exist"):
        make_method("duoattention", 256, pattern_file=str(tmp_path / "nowhere.tsv"))
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(ValueError, match=r"ragged.tsv is not a matrix .*one row per layer and one column per KV head"):
        make_method("duoattention", 256, pattern_file=str(ragged))
    words = tmp_path / "words.tsv"
    words.write_text("0.1\tyes\n")
    with pytest.raises(ValueError, match="words.tsv: could not convert"):
        make_method("duoattention", 256, pattern_file=str(words))
    model = peaky_model()  # 4 layers x 2 KV heads
    wrong = pattern_file(tmp_path, [[0.5, 0.5, 0.5]] * 4, "wrong.tsv")
    with pytest.raises(ValueError, match=r"wrong.tsv has 4 layers x 3 KV heads; this model needs 4 layers x 2 KV "
                                         r"heads"):
        with compress(model, "duoattention", 256, pattern_file=str(wrong)):
            pass


# ====================================================================== PyramidKV
def test_pyramid_budgets_fall_linearly_and_average_to_the_budget():
    assert pyramid_budgets(100, 5, 20) == [196, 147, 100, 52, 5]  # the floors' lost token to layer 0
    assert sum(pyramid_budgets(100, 5, 20)) == 500
    for prefix, layers, beta in [(100, 30, 20), (7, 4, 20), (33, 7, 3), (50, 1, 20)]:
        budgets = pyramid_budgets(prefix, layers, beta)
        assert sum(budgets) == prefix * layers and budgets == sorted(budgets, reverse=True)
        assert budgets[-1] == (prefix // beta if layers > 1 else prefix)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("layer_idx", [0, 2, 3])
def test_pyramidkv_reference(shape, selection, layer_idx):
    b, hkv, g, d = shape
    n, window, num_layers, per_set = 130, 8, 4, 40
    m = make_method("pyramidkv", per_set * (g if selection == "head" else 1), window=window, selection=selection,
                    beta=4, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=layer_idx * 3 + g)
    layer.layer_idx = layer_idx
    layer.state.layers = [layer] * num_layers
    plan = layer.state.plan
    assert plan["prompt_budget"] == per_set and plan["prefix_top"] == (per_set - window) // 4
    split = n - 1
    Q = torch.randn(b, hkv, g, split, d, generator=_gen(2))
    m.compress(layer, Q[..., -window - 2:, :], split, plan, d ** -0.5)
    n_prefix = pyramid_budgets(per_set - window, num_layers, 4)[layer_idx]
    tail = list(range(split - window, n))
    for bi in range(b):
        for kh in range(hkv):
            per_head = [ref_window_scores(Q.double()[bi, kh, h], K.double()[bi, kh], split, window, d ** -0.5)
                        for h in range(g)]
            positions = stored(layer, "positions")[bi, kh].tolist()
            if selection == "group":
                assert positions == ref_top(ref_maxpool(sum(per_head), 7), n_prefix) + tail
                continue
            for h in range(g):
                seen = [p for p, ok in zip(positions, stored(layer, "visible")[bi, kh, h].tolist()) if ok]
                assert seen == ref_top(ref_maxpool(per_head[h], 7), n_prefix) + tail


# ====================================================================== Ada-KV
def ref_adakv(pooled, total, floor):
    """pooled: [Hkv][L] float64 lists of one layer -> the kept prefix positions of each KV head."""
    hkv, n = len(pooled), pooled[0].numel()
    kept = [set(ref_top(pooled[h], floor)) for h in range(hkv)]
    rest = [(-float(pooled[h][j]), h * n + j) for h in range(hkv) for j in range(n) if j not in kept[h]]
    for _, flat in sorted(rest)[:total - hkv * floor]:
        kept[flat // n].add(flat % n)
    return [sorted(k) for k in kept]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget,alpha", [(40, 0.2), (24, 0.0), (40, 1.0)])
def test_adakv_reference(shape, budget, alpha):
    b, hkv, g, d = shape
    n, window = 140, 8
    m = make_method("adakv", budget, window=window, alpha=alpha, kernels="torch")
    layer, K, V = make_layer(m, b, hkv, g, d, n, seed=budget + hkv)
    layer.state.group_size = g
    plan = layer.state.plan
    prefix, floor = budget - window, math.floor(alpha * (budget - window) + 1e-9)
    assert (plan["prefix_per_head"], plan["floor_per_head"]) == (prefix, floor)
    split = n - 1
    # one head of each group concentrated on a few tokens, so the allocation is uneven
    Q = torch.randn(b, hkv, g, split, d, generator=_gen(4))
    Q[:, 0] *= 6
    m.compress(layer, Q[..., -window:, :], split, plan, d ** -0.5)
    tail = list(range(split - window, n))
    kept = {}
    for bi in range(b):
        pooled = [ref_maxpool(sum(ref_window_scores(Q.double()[bi, kh, h], K.double()[bi, kh], split, window,
                                                    d ** -0.5) for h in range(g)), 7) for kh in range(hkv)]
        ref = ref_adakv(pooled, prefix * hkv, floor)
        assert sum(len(r) for r in ref) == prefix * hkv and min(len(r) for r in ref) >= floor
        for kh in range(hkv):
            positions = stored(layer, "positions")[bi, kh].tolist()
            visible = stored(layer, "visible")[bi, kh]
            assert (visible == visible[:1]).all()  # one choice per KV head, shared by its query heads
            seen = [p for p, ok in zip(positions, visible[0].tolist()) if ok]
            assert seen == ref[kh] + tail
            kept[bi, kh] = seen
    if alpha < 1:
        assert len({len(v) for v in kept.values()}) > 1  # the counts differ per head
    m.index(layer, plan, layer.stored)
    base = layer.stored
    decode_steps(m, layer, K, V, 3, lambda bi, kh, h, upto: kept[bi, kh] + list(range(n, n + upto - base)))


# ====================================================================== end to end on a tiny model
def duo_scores(layers=4, heads=2, seed=0):
    return torch.rand(layers, heads, generator=_gen(seed)).tolist()


def duo_file(tmp_path):
    return str(pattern_file(tmp_path, duo_scores()))


@pytest.mark.parametrize("method,opts", [("pyramidkv", {"selection": "group", "window": 8}),
                                         ("pyramidkv", {"selection": "head", "window": 8}),
                                         ("adakv", {"window": 8}), ("duoattention", {"sink": 4, "recent": 12})])
def test_eviction_decodes_exactly_over_what_is_kept(tmp_path, method, opts):
    if method == "duoattention":
        opts = {**opts, "pattern_file": duo_file(tmp_path)}
    model = peaky_model()
    ids = prompt(seed=7)
    # duoattention: S = 91, t = 56 > sink + recent = 16: floor(8 heads * (56 - 16) / (91 - 16)) = 4 retrieval heads
    budget = {"pyramidkv": 24 * (4 if opts.get("selection") == "head" else 1), "adakv": 24, "duoattention": 56}[method]
    session, cache, tokens, logits = run(model, method, budget, max_new=1, ids=ids, **opts)
    assert session.stats()["kept_tokens"] < PROMPT_LEN - 1
    if method == "duoattention":
        assert session.plan["retrieval_heads"] == 4
        cache = duo_attended(cache, torch.tensor(duo_scores()), 4, sink=4, recent=12)
    assert_equals_masked_full_attention(model, ids, cache, tokens, logits)


def duo_attended(cache, scores, n_retrieval, sink, recent):
    """Stand-in cache layers holding the positions the one decode step attends: every stored slot for the
    ``n_retrieval`` best-scored heads, the first ``sink`` and the last ``recent`` slots for the others."""
    best = set(sorted(range(scores.numel()), key=lambda i: (-float(scores.flatten()[i]), i))[:n_retrieval])
    layers = []
    for layer in cache.layers:
        positions = stored(layer, "positions")
        hkv, m = positions.shape[1], positions.shape[2]
        g = 4
        visible = torch.zeros(1, hkv, g, m, dtype=torch.bool)
        for kh in range(hkv):
            if layer.layer_idx * hkv + kh in best:
                visible[0, kh] = True
            else:
                visible[0, kh, :, :sink] = True
                visible[0, kh, :, m - recent:] = True
        layers.append(SimpleNamespace(positions=positions, visible=visible, stored=m, layer_idx=layer.layer_idx))
    return SimpleNamespace(layers=layers)


@pytest.mark.parametrize("method,budget,opts", [("streamingllm", 98, {}), ("pyramidkv", 90 * 4, {}),
                                                ("pyramidkv", 90, {"selection": "group"}), ("adakv", 90, {}),
                                                ("duoattention", 98, {"sink": 4, "recent": 12})])
def test_a_plan_that_keeps_everything_equals_stock_generate(tmp_path, method, budget, opts):
    if method == "duoattention":
        opts = {**opts, "pattern_file": duo_file(tmp_path)}
    model = peaky_model()
    ids = prompt(seed=3)
    stock = model.generate(ids, max_new_tokens=8, do_sample=False)
    with compress(model, method, budget=budget, max_new_tokens=8, **opts) as session:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert session.plan["dense"] and out.tolist() == stock.tolist()
    assert not make_method(method, budget - 1, **opts).plan(PROMPT_LEN, 8, 32, None, 4)["dense"]


@pytest.mark.parametrize("method,budget,opts", [("streamingllm", 24, {}), ("pyramidkv", 64, {"window": 4}),
                                                ("adakv", 24, {"window": 4}), ("duoattention", 70, {"sink": 4,
                                                                                                  "recent": 12})])
def test_a_decode_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch, method, budget, opts):
    if method == "duoattention":
        opts = {**opts, "pattern_file": str(pattern_file(tmp_path, [[0.9, 0.1]]))}
    plan = decode_without_host_reads(monkeypatch, make_method(method, budget, kernels="torch", **opts))
    assert plan.get("retrieval_heads", 1) == 1


def test_grid_from_the_shared_prefill_equals_separate_runs(compose_cfg, tmp_path):
    """The four methods run in a grid from one dense prefill per sample, each cell equal to its separate run
    (DuoAttention with a generated pattern for tiny-random's 4 layers x 2 KV heads)."""
    from test_runner import TINY, read_predictions
    from rocketkv.harness.runner import run as run_cfg

    duo = [f"method.pattern_file={duo_file(tmp_path)}", "method.sink=4", "method.recent=28"]
    methods = ["full", "streamingllm", "pyramidkv", "adakv", "duoattention"]
    grid = run_cfg(compose_cfg(*TINY, f"output_dir={tmp_path / 'grid'}", "limit=2", "method=duoattention", *duo,
                               f"grid.methods=[{','.join(methods)}]", "grid.budgets=[160]"))
    assert len(grid) == len(methods)
    for cell in grid:
        info = cell["run"]
        budget = [] if info["budget"] is None else [f"budget={info['budget']}"]
        [alone] = run_cfg(compose_cfg(*TINY, f"output_dir={tmp_path / 'alone'}", "limit=2",
                                      f"method={info['method']}", *budget, *(duo if info["method"] == "duoattention"
                                                                             else [])))
        keep = ("id", "prediction", "new_tokens", "stats", "budget_params")
        grid_rows, alone_rows = (read_predictions(Path(m["run"]["results_dir"])) for m in (cell, alone))
        assert [{k: r[k] for k in keep} for r in grid_rows] == [{k: r[k] for k in keep} for r in alone_rows]
        if info["method"] != "full":
            assert not grid_rows[-1]["budget_params"]["dense"]


@pytest.mark.parametrize("method,budget,opts", [("streamingllm", 24, {}), ("pyramidkv", 192, {}),
                                                ("adakv", 48, {}), ("duoattention", 40, {"sink": 4, "recent": 12}),
                                                ("duoattention", 16, {})])
def test_a_replayed_step_equals_the_eager_loop(tmp_path, method, budget, opts):
    """The emulated CUDA-graph replay of ``test_decode_step`` (host state frozen at the first step): the sliding
    windows and per-head masks come from device counters only."""
    from test_decode_step import MAX_NEW, FrozenHostReplay, greedy
    from rocketkv.core.graphs import DecodeStep

    if method == "duoattention":  # t = 40: floor(8 * 24 / (102 - 16)) = 2 retrieval heads; t = 16: all stream
        opts = {**opts, "pattern_file": duo_file(tmp_path)}
    eager_tokens, eager_stats = greedy(DecodeStep, method, budget, opts)
    replay_tokens, replay_stats = greedy(FrozenHostReplay, method, budget, opts)
    assert replay_tokens == eager_tokens and replay_stats == eager_stats
    assert eager_stats["decode_steps"] == MAX_NEW
    if method == "streamingllm" or budget == 16:  # every head streams: no step attends more than t
        assert eager_stats["attended_tokens"] == budget
