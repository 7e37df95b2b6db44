"""Accuracy smoke test on CPU: the needle grid (full, topk, snapkv, quest, sparq, rocketkv, hsa x budgets that bite at
2k-4k tokens) on one model, with one shared prefill per prompt; prints score per method x budget next to the
full-KV reference and the wall time.

    python benchmarks/accuracy_smoke.py [--model smollm2-135m] [--lengths 2000 4000] [--budgets 32 64 128 256]

Cells whose budget cannot work on the model (SnapKV per head needs budget >= window x GQA group) are skipped and
shown as "-". Results go to the normal results tree (``--output-dir``, default ``results``), so a rerun resumes
and ``rocketkv-report`` plots them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from rocketkv.harness.runner import run

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", "topk", "snapkv", "quest", "sparq", "rocketkv", "hsa"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--haystack", default="noise")
    ap.add_argument("--output-dir", default=str(REPO / "results"))
    args = ap.parse_args()

    overrides = [f"model={args.model}", "task=needle", f"task.lengths=[{','.join(map(str, args.lengths))}]",
                 f"task.depths=[{','.join(map(str, args.depths))}]", f"task.haystack={args.haystack}",
                 f"grid.methods=[{','.join(args.methods)}]", f"grid.budgets=[{','.join(map(str, args.budgets))}]",
                 "grid.skip_invalid=true", f"output_dir={args.output_dir}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    start = time.perf_counter()
    results = run(cfg)
    wall = time.perf_counter() - start

    scores = {(m["run"]["method"], m["run"]["budget"]): m for m in results}
    full = next((m for m in results if m["run"]["method"] == "full"), None)
    n = max((m["n_samples"] for m in results), default=0)
    print(f"\nmodel={args.model} needle lengths={args.lengths} depths={len(args.depths)} haystack={args.haystack}: "
          f"{n} prompts per cell, {len(results)} cells, wall {wall:.0f} s (one prefill per prompt)")
    if full is not None:
        print(f"full KV: {full['score']:.1f}")
    header = f"{'method':<10}" + "".join(f"{f'@{b}':>8}" for b in args.budgets)
    print(header)
    for name in args.methods:
        if name == "full":
            continue
        cells = [scores.get((name, b)) for b in args.budgets]
        print(f"{name:<10}" + "".join(f"{m['score']:>8.1f}" if m else f"{'-':>8}" for m in cells))


if __name__ == "__main__":
    main()
