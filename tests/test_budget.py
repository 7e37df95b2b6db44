"""Budget resolution: RocketKV's split (the issue's check rows), its fixed-split and adaptive-pooling options, HSA,
Quest/SparQ formulas and budget errors."""
import math

import pytest
import yaml

from conftest import REPO
from rocketkv.core.methods import METHODS
from rocketkv.core.methods.ops import ADAPTIVE_KERNEL_SIZES
from rocketkv.core.session import resolve_budget

D = 128


# ------------------------------------------------------------------ RocketKV check rows (issue)
@pytest.mark.parametrize("prompt_len,t,expected", [
    # S = prompt_len + max_new (max_new = 128)
    (16000 - 128, 256, dict(capacity=1592, prompt_budget=1464, page_size=3, channels=61, topk=128)),
    (8000 - 128, 4096, dict(capacity=6731, prompt_budget=6603, page_size=1, channels=77, topk=2048)),
    (32000 - 128, 1024, dict(capacity=5764, prompt_budget=5636, page_size=3, channels=68, topk=512)),
])
def test_rocketkv_check_rows(prompt_len, t, expected):
    plan = resolve_budget("rocketkv", t, prompt_len, 128, D)
    for key, value in expected.items():
        assert plan[key] == value, (key, plan)


def _stage2_formula(t, cap, d):
    c2 = max(1.0, cap / t)
    p = math.ceil(math.sqrt(c2))
    if p > c2:
        p = 1
    return dict(page_size=p, channels=math.floor(d * p / c2), topk=t // 2)


def _rocketkv_formula(t, prompt_len, max_new, d, model_max_len=None, ratio=None):
    s = prompt_len + max_new if model_max_len is None else min(prompt_len + max_new, model_max_len)
    c = max(1.0, s / t)
    r = min(0.2 + 0.06 * math.log2(c), 0.8) if ratio is None else ratio
    cap = max(math.floor(s / c ** r), min(2 * max_new, s))
    return dict(split_ratio=r, capacity=cap, prompt_budget=cap - max_new, **_stage2_formula(t, cap, d))


@pytest.mark.parametrize("t,prompt_len,max_new,d,mml", [
    (256, 4000, 64, 128, None), (512, 100000, 128, 128, 32768), (2048, 30000, 256, 64, None),
    (64, 3000, 16, 32, None), (100, 777, 20, 32, None), (4096, 120000, 128, 128, None),
])
def test_rocketkv_formula(t, prompt_len, max_new, d, mml):
    plan = resolve_budget("rocketkv", t, prompt_len, max_new, d, model_max_len=mml)
    exp = _rocketkv_formula(t, prompt_len, max_new, d, mml)
    for key, value in exp.items():
        assert plan[key] == value, (key, plan, exp)


def test_rocketkv_model_max_len_caps_s():
    capped = resolve_budget("rocketkv", 256, 20000, 128, D, model_max_len=16000)
    assert capped["capacity"] == 1592 and capped["page_size"] == 3 and capped["channels"] == 61


def test_rocketkv_ratio_is_capped_at_0_8():
    # c = 2**12 -> 0.2 + 0.06*12 = 0.92 -> capped 0.8; C = max(S / c**0.8, 2*max_new)
    t, s, max_new = 16, 16 * 2 ** 12, 8
    plan = resolve_budget("rocketkv", t, s - max_new, max_new, D)
    assert plan["capacity"] == max(math.floor(s / (2 ** 12) ** 0.8), 2 * max_new)


def test_rocketkv_small_context_keeps_2_max_new():
    # S below the budget: c = 1, r = 0.2, C = max(S, min(2 max_new, S)) = S
    plan = resolve_budget("rocketkv", 1024, 300, 64, D)
    assert plan["capacity"] == 364 and plan["prompt_budget"] == 300 and plan["page_size"] == 1
    assert plan["channels"] == D and plan["topk"] == 512


# ------------------------------------------------------------------ RocketKV: fixed split (ablation)
def test_rocketkv_fixed_split_row():
    # S = 16000, t = 256, r = 0.5: c = 62.5, C = floor(16000 / 62.5**0.5) = 2023, P = 1895,
    # c2 = 7.902, p = ceil(2.811) = 3, r_h = floor(128 * 3 / 7.902) = 48
    plan = resolve_budget("rocketkv", 256, 16000 - 128, 128, D, split_ratio=0.5)
    assert plan == {**plan, "split_ratio": 0.5, "capacity": 2023, "prompt_budget": 1895, "page_size": 3,
                    "channels": 48, "topk": 128}


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("t,prompt_len,max_new,d", [(256, 16000 - 128, 128, 128), (1024, 30000, 256, 64),
                                                    (64, 3000, 16, 32)])
def test_rocketkv_fixed_split(ratio, t, prompt_len, max_new, d):
    plan = resolve_budget("rocketkv", t, prompt_len, max_new, d, split_ratio=ratio)
    exp = _rocketkv_formula(t, prompt_len, max_new, d, ratio=ratio)
    assert {key: plan[key] for key in exp} == exp
    adaptive = resolve_budget("rocketkv", t, prompt_len, max_new, d)
    assert adaptive["split_ratio"] == _rocketkv_formula(t, prompt_len, max_new, d)["split_ratio"] != ratio


# ------------------------------------------------------------------ adaptive pooling (SnapKV++)
@pytest.mark.parametrize("method,opts", [("rocketkv", {}), ("snapkv", {"selection": "group"})])
@pytest.mark.parametrize("prompt_len,kernel", [(1000, 63), (49151, 63), (49152, 511), (127500, 511)])
def test_adaptive_kernel_from_the_table(method, opts, prompt_len, kernel):
    auto = resolve_budget(method, 4096, prompt_len, 128, D, kernel_size="auto", **opts)
    assert auto["kernel_size"] == kernel
    fixed = 63 if method == "rocketkv" else 7  # the default: a fixed kernel whatever the length
    assert resolve_budget(method, 4096, prompt_len, 128, D, **opts)["kernel_size"] == fixed


def test_adaptive_kernel_from_a_given_table():
    table = [[0, 5], [100, 9], [1000, 31]]
    kernels = [resolve_budget("rocketkv", 4096, n, 16, D, kernel_size="auto", adaptive_kernel_sizes=table)
               ["kernel_size"] for n in (50, 99, 100, 999, 1000, 5000)]
    assert kernels == [5, 5, 9, 9, 31, 31]


@pytest.mark.parametrize("method", ["rocketkv", "snapkv"])
def test_the_configs_table_is_the_default(method):
    cfg = yaml.safe_load((REPO / "conf" / "method" / f"{method}.yaml").read_text())
    assert [tuple(row) for row in cfg["adaptive_kernel_sizes"]] == list(ADAPTIVE_KERNEL_SIZES)
    assert cfg["kernel_size"] == METHODS[method].kernel_size  # fixed by default (RocketKV: 63, the final paper)


# ------------------------------------------------------------------ HSA: stage 2 on the whole sequence
def test_hsa_row():
    # C = S = 16000, t = 256: c2 = 62.5, p = ceil(7.906) = 8, r_h = floor(128 * 8 / 62.5) = 16, k = 128
    plan = resolve_budget("hsa", 256, 16000 - 128, 128, D)
    assert plan == {"capacity": 16000, "page_size": 8, "channels": 16, "topk": 128, "dense": False}


@pytest.mark.parametrize("t,prompt_len,max_new,d,mml", [
    (256, 4000, 64, 128, None), (512, 100000, 128, 128, 32768), (2048, 30000, 256, 64, None),
    (64, 3000, 16, 32, None), (100, 777, 20, 32, None), (4096, 1000, 128, 128, None),
])
def test_hsa_formula(t, prompt_len, max_new, d, mml):
    s = prompt_len + max_new if mml is None else min(prompt_len + max_new, mml)
    plan = resolve_budget("hsa", t, prompt_len, max_new, d, model_max_len=mml)
    assert plan == {"capacity": s, **_stage2_formula(t, s, d), "dense": t // 2 >= prompt_len + max_new}


# ------------------------------------------------------------------ Quest / SparQ / topk / snapkv
@pytest.mark.parametrize("t,prompt_len,max_new,mml", [(256, 4000, 128, None), (1024, 30000, 128, None),
                                                       (100, 999, 1, None), (64, 50000, 128, 8192),
                                                       (4096, 1000, 128, None)])
def test_quest_plan(t, prompt_len, max_new, mml):
    s = min(prompt_len + max_new, mml) if mml else prompt_len + max_new
    plan = resolve_budget("quest", t, prompt_len, max_new, D, model_max_len=mml)
    assert plan["page_size"] == min(max(1, math.ceil(2 * s / t)), t // 2)
    assert plan["topk"] == t // 2
    assert plan["selected_pages"] == plan["topk"] // plan["page_size"]
    assert plan["page_size_capped"] == (math.ceil(2 * s / t) > t // 2)


@pytest.mark.parametrize("t,prompt_len,page", [(256, 32000, 251), (256, 127500 - 128, 997), (64, 5000, 161)])
def test_quest_never_attends_more_than_k(t, prompt_len, page):
    """Past S = t²/4 the even split's page (⌈2S/t⌉ = ``page``) outgrows k = t/2: it is capped at k, one page."""
    plan = resolve_budget("quest", t, prompt_len, 128, D)
    assert math.ceil(2 * (prompt_len + 128) / t) == page > t // 2
    assert plan["page_size"] == t // 2 and plan["selected_pages"] == 1 and plan["page_size_capped"]
    assert plan["selected_pages"] * plan["page_size"] <= plan["topk"] == t // 2


def test_quest_page_size_override():
    plan = resolve_budget("quest", 256, 4000, 128, D, page_size=16)
    assert plan["page_size"] == 16
    # conf/method/quest.yaml documents the override as original Quest: budget = attended tokens
    assert plan["topk"] == 256


@pytest.mark.parametrize("t,prompt_len,max_new,d,mml", [(256, 4000, 128, 128, None), (1024, 30000, 128, 128, None),
                                                         (16, 100000, 128, 128, None), (64, 50000, 128, 64, 8192),
                                                         (4096, 1000, 128, 128, None), (300, 3000, 100, 32, None)])
def test_sparq_plan(t, prompt_len, max_new, d, mml):
    s = min(prompt_len + max_new, mml) if mml else prompt_len + max_new
    plan = resolve_budget("sparq", t, prompt_len, max_new, d, model_max_len=mml)
    assert plan["channels"] == min(d, max(1, round(d * t / s)))
    assert plan["topk"] == t // 2


def test_sparq_channels_examples():
    # d*t/S = 128*256/4096 = 8 ; 128*1024/16384 = 8 ; 128*16/100128 -> 0.02 -> 1
    assert resolve_budget("sparq", 256, 4096 - 128, 128, 128)["channels"] == 8
    assert resolve_budget("sparq", 1024, 16384 - 128, 128, 128)["channels"] == 8
    assert resolve_budget("sparq", 16, 100000, 128, 128)["channels"] == 1


def test_topk_and_snapkv_plans():
    assert resolve_budget("topk", 300, 5000, 128, D)["topk"] == 300
    assert resolve_budget("snapkv", 512, 5000, 128, D, group_size=4)["prompt_budget"] == 128
    assert resolve_budget("snapkv", 512, 5000, 128, D, group_size=4, selection="group")["prompt_budget"] == 512
    assert resolve_budget("full", None, 5000, 128, D) == {"dense": True}


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("method", ["topk", "snapkv", "quest", "sparq", "rocketkv", "hsa"])
@pytest.mark.parametrize("bad", [15, 0, -256, 256.0, "256", None, True])
def test_bad_budgets(method, bad):
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(method, bad, 4000, 128, D)


@pytest.mark.parametrize("method", ["topk", "quest", "sparq", "hsa"])
def test_minimum_budget_accepted(method):
    resolve_budget(method, 16, 4000, 128, D)


def test_rocketkv_prompt_budget_below_window():
    # S = 100, c = 6.25, r = 0.2 + 0.06*log2(6.25) = 0.3586, c^r = 1.929: C = max(floor(51.8), min(50, 100)) = 51,
    # P = C - 25 = 26 < w = 32 while the prompt (75) is longer than P: eviction would need a window wider than P.
    with pytest.raises(ValueError, match=r"P=26.*window"):
        resolve_budget("rocketkv", 16, 75, 25, D)
    # A prompt no longer than P is kept whole, so a small P is no error: S = 138, C = 138, P = 10 = prompt_len.
    assert resolve_budget("rocketkv", 16, 10, 128, D)["prompt_budget"] == 10


def test_rocketkv_prompt_budget_window_override():
    plan = resolve_budget("rocketkv", 16, 100, 8, D, window=4)
    assert plan["prompt_budget"] >= 4


def test_snapkv_per_head_budget_below_window():
    with pytest.raises(ValueError, match="window"):
        resolve_budget("snapkv", 64, 4000, 128, D, group_size=4)  # t/g = 16 < 32
    resolve_budget("snapkv", 64, 4000, 128, D, group_size=4, selection="group")  # 64 >= 32 per KV head
    with pytest.raises(ValueError, match="window"):
        resolve_budget("snapkv", 16, 4000, 128, D, group_size=1, selection="group")


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as err:
        resolve_budget("h2o", 256, 4000, 128, D)
    for name in ("full", "topk", "snapkv", "quest", "sparq", "rocketkv"):
        assert name in str(err.value)
    assert set(METHODS) >= {"full", "topk", "snapkv", "quest", "sparq", "rocketkv"}


@pytest.mark.parametrize("method", ["full", "topk", "snapkv", "quest", "sparq", "rocketkv", "hsa"])
def test_unknown_option_names(method):
    with pytest.raises(ValueError, match="unknown options.*page_sise"):
        resolve_budget(method, 256, 4000, 128, D, page_sise=16)


def test_bad_option_values():
    with pytest.raises(ValueError, match="selection"):
        resolve_budget("snapkv", 256, 4000, 128, D, selection="token")
    with pytest.raises(ValueError, match="window"):
        resolve_budget("snapkv", 256, 4000, 128, D, window=0)
    with pytest.raises(ValueError, match="skip_layers"):
        resolve_budget("rocketkv", 256, 4000, 128, D, skip_layers=-1)


@pytest.mark.parametrize("page_size", [0, 512, 16.0, True])
def test_quest_page_size_must_fit_the_budget(page_size):
    expected = rf"page_size={page_size!r} is not valid; give an integer from 1 to the budget \(256"
    with pytest.raises(ValueError, match=expected):
        resolve_budget("quest", 256, 4000, 128, D, page_size=page_size)


@pytest.mark.parametrize("method,option,fragments", [
    ("rocketkv", {"kernel_size": "abc"}, ["kernel_size='abc'", "odd integer >= 1", "auto"]),
    ("rocketkv", {"kernel_size": 64}, ["kernel_size=64", "odd integer >= 1"]),
    ("rocketkv", {"kernel_size": 0}, ["kernel_size=0", "odd integer >= 1"]),
    ("rocketkv", {"kernel_size": True}, ["kernel_size=True", "odd integer >= 1"]),
    ("snapkv", {"kernel_size": -7}, ["kernel_size=-7", "odd integer >= 1"]),
    ("rocketkv", {"adaptive_kernel_sizes": [[10, 63]]}, ["adaptive_kernel_sizes=[[10, 63]]", "rising from 0"]),
    ("rocketkv", {"adaptive_kernel_sizes": [[0, 63], [0, 511]]}, ["[[0, 63], [0, 511]]", "rising from 0"]),
    ("rocketkv", {"adaptive_kernel_sizes": [[0, 63], [1000, 512]]}, ["[1000, 512]", "odd kernels"]),
    ("rocketkv", {"adaptive_kernel_sizes": [[0, 63, 1]]}, ["[[0, 63, 1]]", "[from_prompt_len, kernel]"]),
    ("snapkv", {"adaptive_kernel_sizes": []}, ["adaptive_kernel_sizes=[]", "[from_prompt_len, kernel]"]),
    ("rocketkv", {"adaptive_kernel_sizes": 63}, ["adaptive_kernel_sizes=63", "[from_prompt_len, kernel]"]),
    ("rocketkv", {"split_ratio": 0}, ["split_ratio=0", "0 < split_ratio < 1"]),
    ("rocketkv", {"split_ratio": 1.0}, ["split_ratio=1.0", "0 < split_ratio < 1"]),
    ("rocketkv", {"split_ratio": "half"}, ["split_ratio='half'", "0 < split_ratio < 1"]),
])
def test_bad_method_option_values_name_the_value_and_what_is_valid(method, option, fragments):
    with pytest.raises(ValueError) as err:
        resolve_budget(method, 256, 4000, 128, D, **option)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
