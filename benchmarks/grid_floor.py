"""The least a speculative grid can cost on these prompts, next to one full-KV run: every distinct cell is fed its
own exact tokens as the draft (an oracle no drafting can beat), all cells as the packed rows of one forward.

    python benchmarks/grid_floor.py [--model smollm2-135m] [--length 2000] [--samples 3]

Per sample: the single full-KV run (``run_sample``: prefill, then decode step by step); the grid's shared prefill;
each distinct cell decoded alone (its exact tokens); then the oracle grid: forking every distinct cell, full KV's
tokens verified in one forward, and every other cell's tokens verified in one forward.  The same packed forward
through full-KV forks (dense attention for every row) separates the projections from the methods' own attention.
Any ``grid.speculative=true`` run costs at least the oracle: it forks the same cells and must feed each cell at least
its own tokens, with the same methods' attention.  Ratios are measured in one run (these machines are noisy).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
import tempfile

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rocketkv.generation import Timer
from rocketkv.models import ModelSpec, load_model
from rocketkv.prompting import prompt_token_ids
from rocketkv.row_decode import stack_rows
from rocketkv.runner import build_task, check_plans, grid_configs, make_cell, select_samples
from rocketkv.sample_runs import PeakMemory, SharedPrefill, decode_forked, decode_keys, run_sample
from rocketkv.session import CompressionSession, cache_kwarg, compress

from grid_cost import BUDGETS, METHODS, REPO  # the grid grid_cost.py times: this is its floor


def oracle_feed(last_prompt_token: int, tokens: list[int], max_new: int) -> list[int]:
    """What a row must be fed to choose ``tokens`` in one forward: the last prompt token and every token but the
    last, and the last too when the decode ended before ``max_new`` (its end is chosen after it)."""
    return [last_prompt_token] + (tokens[:-1] if len(tokens) >= max_new else tokens)


def verify_once(model, spec, sample, shared, methods, feeds) -> tuple[float, float, int]:
    """Fork one cache per method, then feed every row its tokens as the packed rows of one forward.  Returns the
    forks' seconds, the forward's seconds and how many fed positions chose the token fed after them."""
    with compress(model, method="full", budget=None, model_max_len=spec.max_len), torch.inference_mode():
        with Timer(model.device) as t_fork:
            sessions = [CompressionSession(model, m, sample.max_new_tokens, spec.max_len) for m in methods]
            caches = [s.fork(shared.cache, sample.max_new_tokens) for s in sessions]
        widths = [len(f) for f in feeds]
        seen = caches[0].layers[0].seen
        ids = torch.tensor([[t for f in feeds for t in f]], device=model.device)
        positions = torch.tensor([[seen + j for f in feeds for j in range(len(f))]], device=model.device)
        with Timer(model.device) as t_forward:
            logits = model(input_ids=ids, position_ids=positions, use_cache=True,
                           **{cache_kwarg(model): stack_rows(caches, widths)}).logits[0]
            chosen = logits.argmax(-1).split(widths)
    agree = sum(int((c[:-1] == torch.tensor(f[1:], device=c.device)).sum()) for c, f in zip(chosen, feeds))
    for s in sessions:
        s.release()
    return t_fork.seconds, t_forward.seconds, agree


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(REPO / "conf"),
                                                                     version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model={args.model}", "task=needle", f"task.lengths=[{args.length}]", f"output_dir={tmp}",
            f"grid.methods=[{','.join(METHODS)}]", f"grid.budgets=[{','.join(map(str, BUDGETS))}]"])
        spec = ModelSpec.from_cfg(OmegaConf.to_container(cfg.model, resolve=True))
        task = build_task(cfg.task)
        cells = [make_cell(c, spec.name, None) for c in grid_configs(cfg)]
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        model, tokenizer = load_model(spec)
        samples = select_samples(task.samples(tokenizer, spec.max_len), args.samples)
        prompts = {s.id: prompt_token_ids(tokenizer, s, spec.chat_template, spec.max_len) for s in samples}
        cells = check_plans(cells, samples, prompts, model, spec, skip=True)
        full_cell = next(c for c in cells if c.method.is_reference)
        totals: dict[str, float] = defaultdict(float)  # seconds summed over the samples, in the order first added
        fed = agreed = 0
        run_sample(model, tokenizer, spec, samples[0], prompts[samples[0].id], full_cell, task)  # warm-up
        for sample in samples:
            ids = prompts[sample.id]
            record = run_sample(model, tokenizer, spec, sample, ids, full_cell, task)
            totals["single run: prefill"] += record["time_prefill_s"]
            totals["single run: decode step by step"] += record["time_decode_s"]
            mem = PeakMemory(model.device)
            shared = SharedPrefill.run(model, spec, sample, ids, max(c.method.window for c in cells), mem)
            totals["grid: shared prefill"] += shared.seconds
            distinct = decode_keys(spec, sample, ids, shared, cells)[2]
            dense = distinct.pop("dense")
            tokens = {key: decode_forked(model, tokenizer, spec, sample, ids, task, shared, mem, cell).tokens
                      for key, cell in [("dense", dense), *distinct.items()]}  # each cell alone: its exact tokens
            feeds = {key: oracle_feed(ids[-1], t, sample.max_new_tokens) for key, t in tokens.items()}
            t_fork, t_full, a_full = verify_once(model, spec, sample, shared, [dense.method], [feeds["dense"]])
            totals["oracle: fork full KV"] += t_fork
            totals["oracle: full KV's tokens in one forward"] += t_full
            rows = [feeds[key] for key in distinct]
            t_fork, t_rows, a_rows = verify_once(model, spec, sample, shared, [c.method for c in distinct.values()],
                                                 rows)
            totals[f"oracle: fork the other cells ({len(rows)})"] += t_fork
            totals["oracle: their tokens in one forward"] += t_rows
            _, t_dense, _ = verify_once(model, spec, sample, shared, [dense.method] * len(rows), rows)
            totals["  the same rows with dense attention"] += t_dense
            fed += sum(len(f) - 1 for f in [feeds["dense"], *rows])
            agreed += a_full + a_rows
            del shared
    n = len(samples)
    per = {k: v / n for k, v in totals.items()}
    single = per["single run: prefill"] + per["single run: decode step by step"]
    oracle = per["grid: shared prefill"] + sum(v for k, v in per.items() if k.startswith("oracle:"))
    print(f"model={args.model} needle length={args.length} samples={n} (seconds per sample)")
    for key, value in per.items():
        print(f"{key:<44} {value:8.3f}")
    print(f"{'single full-KV run':<44} {single:8.3f}  1.00")
    print(f"{'oracle grid (shared prefill + oracle rows)':<44} {oracle:8.3f}  {oracle / single:.2f}")
    print(f"the 1.3x target leaves {1.3 * single - per['grid: shared prefill']:.3f} s per sample after the shared "
          f"prefill; the oracle spends {oracle - per['grid: shared prefill']:.3f} s there")
    print(f"{agreed}/{fed} oracle positions chose the exact path's next token (batched rounding can flip a near tie)")


if __name__ == "__main__":
    main()
