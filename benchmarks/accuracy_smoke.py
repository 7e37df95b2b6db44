"""Accuracy smoke test on CPU: the needle grid (full, topk, snapkv, quest, sparq, rocketkv, hsa, streamingllm,
pyramidkv, adakv, duoattention x budgets that bite at 2k-4k tokens) on one model, with one shared prefill per
prompt; prints score per method x budget next to the full-KV reference and the wall time.

    python benchmarks/accuracy_smoke.py [--model smollm2-135m] [--lengths 2000 4000] [--budgets 32 64 128 256]
        [--query-agnostic] [--duo-pattern full_attention_heads.tsv]

``--query-agnostic`` runs the same grid with ``task.query_aware=false`` (the haystack compressed before the question
is fed).  DuoAttention needs a pattern file for the model (``--duo-pattern``); without one, and when every budget is
<= 640 (where the paper's mapping makes every head a streaming head, so the pattern is never read), a uniform
pattern of the model's shape is written to the output folder; with larger budgets duoattention is left out.

Cells whose budget cannot work on the model (SnapKV per head needs budget >= window x GQA group) are skipped and
shown as "-". Results go to the normal results tree (``--output-dir``, default ``results``), so a rerun resumes
and ``rocketkv-report`` plots them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rocketkv.harness.runner import run

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", "topk", "snapkv", "quest", "sparq", "rocketkv", "hsa", "streamingllm", "pyramidkv", "adakv",
           "duoattention"]
ALL_STREAMING = 640  # DuoAttention's sink + recent: at budgets up to this every head streams


def duo_overrides(args, methods: list[str]) -> tuple[list[str], list[str]]:
    """The overrides that give duoattention its pattern file, and the methods left to run."""
    if "duoattention" not in methods:
        return [], methods
    path = args.duo_pattern
    if path is None:
        if max(args.budgets) > ALL_STREAMING:
            print("duoattention left out: budgets above 640 need its pattern file (--duo-pattern)")
            return [], [m for m in methods if m != "duoattention"]
        from rocketkv.core import AttentionShape
        from rocketkv.harness.models import ModelSpec, load_model

        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            model_cfg = compose("config", overrides=[f"model={args.model}"]).model
        model, _ = load_model(ModelSpec.from_cfg(OmegaConf.to_container(model_cfg, resolve=True)))
        shape = AttentionShape.of(model)
        path = Path(args.output_dir) / f"uniform_pattern_{args.model}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(["\t".join(["0.5"] * shape.num_kv_heads)] * shape.num_layers) + "\n")
    # options reach a grid's cells through the run's own method (grid.methods read the others' config files)
    return ["method=duoattention", f"method.pattern_file={path}"], methods


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--haystack", default="noise")
    ap.add_argument("--output-dir", default=str(REPO / "results"))
    ap.add_argument("--query-agnostic", action="store_true", help="task.query_aware=false")
    ap.add_argument("--duo-pattern", default=None, help="DuoAttention's full_attention_heads.tsv for the model")
    args = ap.parse_args()
    duo, args.methods = duo_overrides(args, list(args.methods))

    overrides = [f"model={args.model}", "task=needle", f"task.lengths=[{','.join(map(str, args.lengths))}]",
                 f"task.depths=[{','.join(map(str, args.depths))}]", f"task.haystack={args.haystack}",
                 f"grid.methods=[{','.join(args.methods)}]", f"grid.budgets=[{','.join(map(str, args.budgets))}]",
                 "grid.skip_invalid=true", f"output_dir={args.output_dir}",
                 f"task.query_aware={str(not args.query_agnostic).lower()}", *duo]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    start = time.perf_counter()
    results = run(cfg)
    wall = time.perf_counter() - start

    scores = {(m["run"]["method"], m["run"]["budget"]): m for m in results}
    full = next((m for m in results if m["run"]["method"] == "full"), None)
    n = max((m["n_samples"] for m in results), default=0)
    mode = "query-agnostic" if args.query_agnostic else "query-aware"
    print(f"\nmodel={args.model} needle ({mode}) lengths={args.lengths} depths={len(args.depths)} "
          f"haystack={args.haystack}: {n} prompts per cell, {len(results)} cells, wall {wall:.0f} s "
          "(one prefill per prompt)")
    if full is not None:
        print(f"full KV: {full['score']:.1f}")
    header = f"{'method':<13}" + "".join(f"{f'@{b}':>8}" for b in args.budgets)
    print(header)
    for name in args.methods:
        if name == "full":
            continue
        cells = [scores.get((name, b)) for b in args.budgets]
        print(f"{name:<13}" + "".join(f"{m['score']:>8.1f}" if m else f"{'-':>8}" for m in cells))


if __name__ == "__main__":
    main()
