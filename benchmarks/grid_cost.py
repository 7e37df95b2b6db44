"""Cost of a method x budget grid with one shared prefill per sample vs the same cells run separately vs one
full-KV run, measured in one process on the same prompts.

    python benchmarks/grid_cost.py [--model smollm2-135m] [--length 2000] [--samples 3]

Prints wall times and ratios to a single full-KV run (timed before and after the grid; the ratios use the mean of
the two) for the grid (every distinct cell decoded alone, bit for bit a separate run) and, with ``--separate``, the
same cells run one by one.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from rocketkv.harness.runner import run

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", "snapkv", "quest", "sparq", "topk", "rocketkv"]
BUDGETS = [256, 512, 1024, 2048, 4096]


def timed(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    start = time.perf_counter()
    results = run(cfg)
    return time.perf_counter() - start, results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--separate", action="store_true", help="also run the cells one by one (slow)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"model={args.model}", "task=needle", f"task.lengths=[{args.length}]", f"limit={args.samples}",
                "update_leaderboard=false", "progress=false"]
        timed(base + [f"output_dir={tmp}/warm", "method=full"])  # model cache warm-up, not counted
        full_before, [full_metrics] = timed(base + [f"output_dir={tmp}/full", "method=full"])
        grid_args = [f"grid.methods=[{','.join(METHODS)}]", f"grid.budgets=[{','.join(map(str, BUDGETS))}]",
                     "grid.skip_invalid=true"]
        grid, cells = timed(base + [f"output_dir={tmp}/grid"] + grid_args)
        rows = [(f"grid, {len(cells)} cells, shared prefill", grid)]
        if args.separate:
            separate = 0.0
            for cell in cells:
                budget = cell["run"]["budget"]
                separate += timed(base + [f"output_dir={tmp}/sep", f"method={cell['run']['method']}"]
                                  + ([f"budget={budget}"] if budget is not None else []))[0]
            rows.append((f"{len(cells)} separate runs", separate))
        # the same single run again, after the grids: this machine's speed drifts, so the ratios use the mean
        full_after = timed(base + [f"output_dir={tmp}/full_again", "method=full"])[0]
        full = (full_before + full_after) / 2
        rows.insert(0, ("single full-KV run", full))
    print(f"model={args.model} needle length={args.length} samples={args.samples}")
    print(f"{'configuration':<40} {'seconds':>9} {'vs full run':>12}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds:>9.1f} {seconds / full:>12.2f}")
    print(f"the single full-KV run took {full_before:.1f} s before the grids and {full_after:.1f} s after them")
    print(f"per sample: one prefill {full_metrics['timing']['prefill_s_mean']:.2f} s, full-KV decode "
          f"{full_metrics['timing']['decode_s_mean']:.2f} s")


if __name__ == "__main__":
    main()
