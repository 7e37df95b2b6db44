"""The selection kernels (triton_pages.py, triton_select.py) against their torch references.

    TRITON_INTERPRET=1 python tests/selection_interpret_check.py [--large]

Selections must be equal exactly (given the same scores, and end to end from the same page tables at these
seeds); scores and probabilities to fp32 rounding.  ``--large`` adds Llama-8B heads (32 q / 8 kv, d = 128) with the
page size, channels and top-k of HSA / RocketKV plans at 16k-96k tokens, batch 1 and 8, and rows of 5,000 units (the
torch path's pruned top-k).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from rocketkv.core import kernels
from rocketkv.core.methods.hsa import stage2_budget
from rocketkv.core.methods.rocketkv import rocketkv_budget

# (batch, kv_heads, group, head_dim, capacity, upto, page_size, channels, topk)
SMALL = [(1, 2, 4, 32, 97, 97, 3, 5, 21), (2, 3, 1, 16, 131, 100, 1, 2, 16), (1, 1, 3, 12, 50, 41, 4, 8, 30),
         (2, 2, 2, 24, 40, 17, 2, 3, 100), (1, 2, 5, 64, 301, 300, 7, 64, 64)]


def plan_cases(batch):
    cases = []
    for tokens in (16384, 32768, 98304):
        for plan in (stage2_budget(256, tokens, 128), rocketkv_budget(256, tokens - 256, 256, 128)):
            capacity = plan.get("capacity", tokens)
            pages = -(-capacity // plan["page_size"])
            # few slots per page would make the tensors large: keep the plan's page size, channels and top-k, and
            # only enough pages for the selection to be non-trivial
            pages = min(pages, 96)
            cap = pages * plan["page_size"]
            cases.append((batch, 8, 4, 128, cap, cap - plan["page_size"] // 2, plan["page_size"], plan["channels"],
                          min(plan["topk"], cap // 2)))
    return cases


def page_tables(keys, page_size):
    b, h, c, d = keys.shape
    pages = -(-c // page_size)
    padded = torch.cat([keys, keys[:, :, -1:].expand(b, h, pages * page_size - c, d)], dim=2)
    view = padded.view(b, h, pages, page_size, d)
    return view.amin(3).transpose(2, 3).contiguous(), view.amax(3).transpose(2, 3).contiguous()


def check(case, seed=0):
    b, hkv, g, d, cap, upto, p, r, k = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv, g, d, generator=gen)
    keys = torch.randn(b, hkv, cap, d, generator=gen)
    keys[:, :, 1::5] = keys[:, :, ::5][:, :, : keys[:, :, 1::5].shape[2]]  # duplicate keys: tied pages
    low, high = page_tables(keys, p)
    upto_t = torch.tensor(upto)
    lines = []

    def same(name, got, want, exact=False):
        if got.shape != want.shape:
            lines.append((False, f"FAIL {name}{case}: shape {tuple(got.shape)} != {tuple(want.shape)}"))
            return
        both_inf = torch.isinf(got) & (got == want)  # -inf past upto on both sides
        diff = torch.where(both_inf, 0.0, got.double() - want.double()).abs()
        err = diff.max().item() if got.numel() else 0.0
        scale = want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 1.0
        ok = torch.equal(got, want) if exact else err <= 1e-5 * max(1.0, scale)
        lines.append((ok, f"{'ok  ' if ok else 'FAIL'} {name}{case}: max_err={err:.2e}"))

    probs = {be: kernels.hsa_page_probs(q, low, high, upto_t, p, r, backend=be) for be in ("torch", "triton")}
    live = -(-upto // p)
    same("hsa_page_probs", probs["triton"][..., :live], probs["torch"][..., :live])
    zero = {be: kernels.hsa_page_probs(torch.zeros_like(q), low, high, upto_t, p, r, backend=be)[..., :live]
            for be in ("torch", "triton")}  # a zero query: finite, uniform scores on both paths
    same("hsa_page_probs zero query", zero["triton"], zero["torch"])
    finite = bool(torch.isfinite(zero["triton"]).all())
    lines.append((finite, f"{'ok  ' if finite else 'FAIL'} hsa_page_probs zero query is finite{case}"))
    width = min(k, low.shape[-1] * p)
    for name, scores in (("given scores", probs["torch"]), ("tied scores", (probs["torch"] * 8).round() / 8)):
        got = kernels.select_units(scores, upto_t, p, k, width, True, backend="triton")
        want = kernels.select_units(scores, upto_t, p, k, width, True, backend="torch")
        same(f"stage2 select ({name})", got[0], want[0], exact=True)
        same(f"stage2 count ({name})", got[1], want[1], exact=True)
    end_to_end = kernels.select_units(probs["triton"], upto_t, p, k, width, True, backend="triton")[0]
    same("stage2 end to end", end_to_end, kernels.select_units(probs["torch"], upto_t, p, k, width, True,
                                                               backend="torch")[0], exact=True)

    quest = {be: kernels.quest_group_scores(q, low, high, upto_t, p, backend=be) for be in ("torch", "triton")}
    same("quest_group_scores", quest["triton"][..., :live], quest["torch"][..., :live])
    m = max(1, k // p)
    for name, scores in (("given", quest["torch"]), ("tied", quest["torch"].round())):
        got = kernels.select_units(scores, upto_t, p, m, m * p, False, backend="triton")
        want = kernels.select_units(scores, upto_t, p, m, m * p, False, backend="torch")
        same(f"quest select ({name})", got[0], want[0], exact=True)

    if cap <= 512:  # per-head scores over every slot (top-k, SparQ)
        exact = {be: kernels.slot_scores(q, keys, upto_t, backend=be) for be in ("torch", "triton")}
        same("slot_scores", exact["triton"], exact["torch"])
        ch = q.abs().topk(min(r, d), dim=-1).indices
        sparq = {be: kernels.slot_scores(q, keys, upto_t, ch, backend=be) for be in ("torch", "triton")}
        same("slot_scores channels", sparq["triton"], sparq["torch"])
        by_channel = keys.transpose(2, 3).contiguous().mT  # SparQ's channel-major copy of K
        sparq_t = {be: kernels.slot_scores(q, by_channel, upto_t, ch, backend=be) for be in ("torch", "triton")}
        same("slot_scores channels (channel-major K)", sparq_t["triton"], sparq_t["torch"])
        same("slot_scores channels (channel-major K = row-major K)", sparq_t["torch"], sparq["torch"])
        rows = exact["torch"].flatten(1, 2)
        for name, scores in (("given", rows), ("tied", rows.round())):
            got = kernels.select_units(scores, upto_t, 1, k, min(k, cap), False, True, backend="triton")
            want = kernels.select_units(scores, upto_t, 1, k, min(k, cap), False, True, backend="torch")
            same(f"slot select ({name})", got[0], want[0], exact=True)
            same(f"slot select mass ({name})", got[2], want[2])
            sets = got[0].view(b, hkv, g, -1)
            for chans in (None, ch):
                reads = {be: kernels.union_reads(sets, upto_t, 7, cap, chans, d, backend=be) for be in ("torch", "triton")}
                same(f"union_reads ({name}, channels={chans is not None})", reads["triton"], reads["torch"],
                     exact=True)

    tables = {be: (low.clone(), high.clone()) for be in ("torch", "triton")}
    keys[:, :, upto - 1] = torch.randn(b, hkv, d, generator=gen) * 3
    for be, (lo, hi) in tables.items():
        if not kernels.fold_page_bounds(keys, lo, hi, upto_t, p, backend=be):
            from rocketkv.core.methods.pages import fold_reference
            fold_reference(keys, lo, hi, upto_t, p)
    same("fold_page_bounds", torch.cat(tables["triton"]), torch.cat(tables["torch"]), exact=True)

    values = torch.randn(keys.shape, generator=gen)
    sparq = {be: (torch.randn(b, hkv, d, cap, generator=gen), torch.randn(b, hkv, d, generator=gen))
             for be in ("torch", "triton")}
    sparq["triton"] = tuple(t.clone() for t in sparq["torch"])
    for be, (keys_t, value_sum) in sparq.items():
        if not kernels.fold_sparq_slot(keys, values, keys_t, value_sum, upto_t, backend=be):
            from rocketkv.core.methods.sparq import fold_reference
            fold_reference(keys, values, keys_t, value_sum, upto_t)
    same("fold_sparq_slot (K copy)", sparq["triton"][0], sparq["torch"][0], exact=True)
    same("fold_sparq_slot (V sum)", sparq["triton"][1], sparq["torch"][1], exact=True)
    return lines


def check_methods(seed=0):
    """Whole decode steps (fold, selection, attention, statistics) of each sparse method: Triton == torch."""
    from rocketkv.core.cache import CompressedLayer
    from rocketkv.core.methods import make_method
    from rocketkv.core.state import GenerationState

    lines = []
    b, hkv, g, d, n = 2, 2, 4, 32, 150
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, hkv, n + 2, d, generator=gen), torch.randn(b, hkv, n + 2, d, generator=gen)
    q = torch.randn(b, hkv, g, d, generator=gen)
    for name in ("hsa", "quest", "topk", "sparq"):
        results = {}
        for be in ("torch", "triton"):
            method = make_method(name, 48, kernels=be)
            state = GenerationState(method, 8, None)
            state.plan = method.plan(n, 8, d, None, g)
            layer = CompressedLayer(state, 0)
            state.layers = [layer]
            layer.update(k[:, :, :n], v[:, :, :n])
            method.index(layer, state.plan, n)
            outs = []
            for step in range(2):
                layer.update(k[:, :, n + step:n + step + 1], v[:, :, n + step:n + step + 1])
                upto = torch.tensor(layer.stored)
                method.index(layer, state.plan, upto)
                out, cost = method.decode(layer, q, upto, state.plan, d ** -0.5)
                outs.append(torch.cat([out.flatten(), torch.tensor(cost.total())]))
            results[be] = torch.stack(outs)
        err = (results["triton"] - results["torch"]).abs().max().item()
        ok = err <= 1e-4
        lines.append((ok, f"{'ok  ' if ok else 'FAIL'} {name} decode steps (outputs, statistics): max_err={err:.2e}"))
    return lines


def check_long_rows(units=5000, seed=0):
    """Rows long enough for the torch path's pruned top-k (``reference.PRUNE_FROM``): the same units and mass as the
    Triton kernel, with exact ties and finite scores past ``upto`` (which never count)."""
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for kind in ("random", "tied"):
        scores = torch.randn(2, 3, units, generator=gen)
        if kind == "tied":
            scores = scores.mul(2).round()
        for p, split, budget in ((1, False, 256), (1, False, 128), (3, True, 128)):
            upto = torch.tensor(units * p - 5)
            width = budget if split else budget * p
            got, want = (kernels.select_units(scores, upto, p, budget, width, split, mass=p == 1, backend=be)
                         for be in ("triton", "torch"))
            ok = torch.equal(got[0], want[0]) and torch.equal(got[1].long(), want[1].long()) and (
                p != 1 or torch.allclose(got[2].float(), want[2].float(), atol=1e-6))
            lines.append((ok, f"{'ok  ' if ok else 'FAIL'} long rows ({kind}, {units} units, page {p}, "
                              f"{'split' if split else 'whole units'}, budget {budget})"))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        print("triton kernels on CPU need TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    cases = SMALL + (plan_cases(1) + plan_cases(8) if args.large else [])
    results = [line for case in cases for line in check(case)] + check_methods()
    if args.large:
        results += check_long_rows()
    print("\n".join(text for _, text in results))
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
