"""What ``torch.topk`` keeps of values tied at its cut, on this machine's devices: the lowest indices, the highest,
or a mix.  RocketKV's stage 2 gives every token of a page its page's score, so its top-k cut often splits a page;
the official code keeps whatever ``torch.topk`` returns, ours keeps the lowest slots (docs/methods.md, "Ties at
the cut").  Runs in seconds on CPU; ``benchmarks/gpu_check.sh`` calls it on CUDA.

    python benchmarks/topk_ties.py                   # CPU, and CUDA when present
    python benchmarks/topk_ties.py --device cuda
    python benchmarks/topk_ties.py --measure needle  # smoke scores: our rule against keeping the highest slots

Each case: a row of ``n`` scores with ``m`` distinct winners and a block of ``t`` tied scores (contiguous like a
page, or spread over the row), cut at ``k = m + t/2``; the verdict says which tied indices came back.  The last
line per device is the summary: ``<device>: topk ties -> lowest|highest|mixed (...)``.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

LENGTHS = (64, 1024, 4096, 32768, 131072)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tie_case(n: int, layout: str, dtype: torch.dtype, device: str, rows: int = 4):
    """Scores ``[rows, n]``, the cut ``k`` and the tied indices (ascending)."""
    gen = torch.Generator().manual_seed(n)
    scores = torch.rand(rows, n, generator=gen) * 0.5  # losers, below the tie
    t = max(4, min(64, n // 8))
    m = max(1, n // 16)
    order = torch.randperm(n, generator=gen)
    if layout == "page":
        start = n // 3
        tied = torch.arange(start, start + t)
        rest = order[~torch.isin(order, tied)]
    else:
        tied, rest = order[:t].sort().values, order[t:]
    winners = rest[:m]
    scores[:, tied] = 0.75
    scores[:, winners] = 1.0 + torch.rand(rows, m, generator=gen)
    return scores.to(device=device, dtype=dtype), m + t // 2, tied.to(device)


def verdict(chosen_tied: torch.Tensor, tied: torch.Tensor, want: int) -> str:
    if torch.equal(chosen_tied, tied[:want]):
        return "lowest"
    if torch.equal(chosen_tied, tied[-want:]):
        return "highest"
    return "mixed"


def probe(device: str) -> dict[str, int]:
    counts = {"lowest": 0, "highest": 0, "mixed": 0}
    for n, layout, dtype, is_sorted in itertools.product(LENGTHS, ("page", "spread"), DTYPES, (False, True)):
        scores, k, tied = tie_case(n, layout, dtype, device)
        idx = scores.topk(k, dim=-1, sorted=is_sorted).indices
        seen = []
        for row in idx:
            chosen = row[torch.isin(row, tied)].sort().values
            seen.append(verdict(chosen, tied, len(chosen)))
            counts[seen[-1]] += 1
        print(f"{device:>5} n={n:<7} {layout:<6} {str(dtype).removeprefix('torch.'):<8} sorted={is_sorted!s:<5} "
              f"k={k:<5} tied={len(tied):<3} rows -> {' '.join(seen)}")
    return counts


def summary(device: str, counts: dict[str, int]) -> str:
    kinds = [kind for kind, c in counts.items() if c]
    overall = kinds[0] if len(kinds) == 1 else "mixed"
    detail = ", ".join(f"{kind} {c}" for kind, c in counts.items())
    return f"{device}: topk ties -> {overall} ({detail} of {sum(counts.values())} rows; torch {torch.__version__})"


# ---------------------------------------------------------------------- the smoke-score measurement
def highest_ties(original):
    """``kernels.select_units`` keeping the highest live slots of the page at the cut instead of its lowest (for the
    measurement only; the torch path)."""
    calls = [0]

    def patched(scores, upto, page_size, budget, width, split, mass=False, backend="auto", masked=False):
        calls[0] += 1
        chosen, count, alpha = original(scores, upto, page_size, budget, width, split, mass, backend="torch",
                                        masked=masked)
        if not split or page_size == 1:
            return chosen, count, alpha
        taken = chosen >= 0
        page = torch.where(taken, chosen // page_size, 0)
        per_page = torch.zeros_like(scores, dtype=torch.long).scatter_add_(-1, page, taken.long())
        live = (upto - torch.arange(scores.shape[-1], device=scores.device) * page_size).clamp(0, page_size)
        shift = torch.where((per_page > 0) & (per_page < live), live - per_page, 0)  # the split page only
        moved = torch.where(taken, chosen + shift.gather(-1, page), chosen)
        return torch.where(taken, moved, moved.amax() + 1).sort(dim=-1).values.masked_fill_(~taken, -1), count, alpha

    return patched, calls


def patch_ties(monkey: list) -> list:
    """Swap ``select_units`` in ``rocketkv.core.kernels`` (every method calls it through the module); returns the
    call counter."""
    from rocketkv.core import kernels

    patched, calls = highest_ties(kernels.select_units)
    monkey.append((kernels, kernels.select_units))
    kernels.select_units = patched
    return calls


def unpatch(monkey: list) -> None:
    for module, original in monkey:
        module.select_units = original
    monkey.clear()


def measure(which: str, out: Path, budgets: list[int], data: Path | None = None) -> None:
    from hydra import compose, initialize_config_dir

    from rocketkv.harness.runner import run

    repo = Path(__file__).resolve().parents[1]
    common = ["update_leaderboard=false", "progress=false", "grid.methods=[full,rocketkv,hsa]",
              f"grid.budgets=[{','.join(map(str, budgets))}]", "grid.skip_invalid=true"]
    if which == "needle":
        task = ["task=needle", "task.lengths=[2000,4000]", "task.depths=[0.0,0.25,0.5,0.75,1.0]"]
    else:  # the real multi_news rows beside the checkout (developers' machines), cut to 4k tokens
        data = data or repo.parent / "shared" / "data" / "longbench"
        task = ["task=longbench", f"task.data_dir={data}", "task.subsets=[multi_news]", "limit=1",
                "model.max_len=4096", f"task.cache_dir={out / 'cache'}"]
    rows = {}
    for rule in ("lowest", "highest"):
        monkey: list = []
        calls = patch_ties(monkey) if rule == "highest" else None
        try:
            with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=[*common, *task, f"output_dir={out / rule}"])
            start = time.perf_counter()
            results = run(cfg)
            wall = time.perf_counter() - start
        finally:
            unpatch(monkey)
        if calls is not None and not calls[0]:
            raise SystemExit("the highest-ties switch was never called: topk_slots moved; update patch_ties")
        rows[rule] = {(m["run"]["method"], m["run"]["budget"]): m["score"] for m in results}
        print(f"{which}, ties -> {rule} slots: {len(results)} cells in {wall:.0f} s")
    print(f"\n{which} score, ties kept at the lowest slots (ours) / the highest slots")
    for (method, budget), score in sorted(rows["lowest"].items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        other = rows["highest"].get((method, budget))
        print(f"{method:<9} @{budget!s:<5} {score:7.2f} / {other:7.2f}   diff {other - score:+.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", action="append", help="cpu, cuda (default: cpu, and cuda when present)")
    ap.add_argument("--measure", choices=["needle", "longbench"], help="smoke scores under both tie rules")
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--output-dir", default="results/topk_ties")
    ap.add_argument("--data-dir", type=Path, help="LongBench jsonl folder (default: ../shared/data/longbench)")
    args = ap.parse_args()
    if args.measure:
        measure(args.measure, Path(args.output_dir).resolve(), args.budgets, args.data_dir)
        return
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    lines = [summary(device, probe(device)) for device in devices]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
