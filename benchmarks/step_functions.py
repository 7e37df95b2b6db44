"""Where a decode step's time goes, per method: each selection function timed inside the real step (µs per layer).

    python benchmarks/step_functions.py [--model smollm2-135m] [--length 8000] [--methods full rocketkv topk sparq]
                                        [--budget 256] [--rounds 4] [--kernels auto torch]

One dense prefill of a random prompt is shared by every method (``CompressionSession.fork``, as the efficiency task
does); then the methods' decode steps run interleaved, three steps each per round, so that all of them see the same
machine; with several ``--kernels`` backends each method runs under each (``topk[torch]``), also interleaved.
It prints each method's median ms per step, its ratio to full KV, and the µs per layer spent in the torch /
Triton functions a step calls (``kernels.*``, ``attend_indices``, the page fold, and ``attention`` = the whole decode
attention of a layer).  Functions are timed where the step calls them: on CPU a small op costs several times more
there than in a loop of its own (the weight matmuls between layers leave the caches cold).  Timing adds ~1 µs per
call.  Synchronises the device around each step on CUDA; the functions' times are then host (launch) times.
"""
from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rocketkv.core.attention as attention  # noqa: E402
from rocketkv.core import compress, kernels  # noqa: E402
from rocketkv.core.graphs import DecodeStep  # noqa: E402
from rocketkv.core.methods import hsa, pages, sparq, topk  # noqa: E402
from rocketkv.core.session import cache_kwarg  # noqa: E402
from rocketkv.harness.generation import Timer, forward  # noqa: E402
from rocketkv.harness.models import load_model  # noqa: E402

SPENT: dict[str, float] = collections.defaultdict(float)
TIMING = [False]


def timed(module, name: str, label: str | None = None) -> None:
    """Replace ``module.name`` by a wrapper adding its wall time to ``SPENT[label]`` while ``TIMING[0]``."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        if not TIMING[0]:
            return inner(*args, **kwargs)
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[label or name] += time.perf_counter() - start

    setattr(module, name, wrapper)


def instrument() -> None:
    for name in ("hsa_page_probs", "quest_group_scores", "select_units", "slot_scores", "union_reads",
                 "fold_page_bounds", "fold_sparq_slot"):
        timed(kernels, name)
    for module in (hsa, sparq, topk):
        timed(module, "attend_indices")
    timed(pages, "fold_reference")
    timed(sparq, "fold_reference", "fold_sparq_reference")
    timed(attention, "_decode", "attention")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model/*.yaml name")
    parser.add_argument("--length", type=int, default=8000, help="prompt tokens")
    parser.add_argument("--methods", nargs="+", default=["full", "rocketkv", "topk", "sparq", "quest"])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of three interleaved steps per method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", nargs="+", default=["auto"], help="kernel backends (method option kernels)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    instrument()
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{args.model}.yaml")
    model, _ = load_model(cfg)
    device = model.device
    vocab = min(10_000, model.config.vocab_size)
    prompt = [random.Random(0).randrange(min(100, vocab // 2), vocab) for _ in range(args.length)]
    new = 3 * args.rounds + 8
    sessions, steps = [], {}
    with torch.inference_mode():
        with compress(model, "full", None, max_new_tokens=new) as dense:
            shared = dense.new_cache(new, prompt_len=args.length, capture_window=64)
            start = time.perf_counter()
            forward(model, [prompt[:-1]], shared)
            print(f"{args.model}, prompt {args.length} tokens, prefill {time.perf_counter() - start:.0f} s, "
                  f"{args.threads} thread(s), budget {args.budget}")
        for method, backend in [(m, k) for m in args.methods for k in args.kernels]:
            name = method if len(args.kernels) == 1 else f"{method}[{backend}]"
            context = compress(model, method, None if method == "full" else args.budget, max_new_tokens=new,
                               kernels=backend)
            session = context.__enter__()
            sessions.append(context)
            cache = session.fork(shared, None, new)
            token = forward(model, [prompt[-1:]], cache).argmax(-1)
            step = DecodeStep(model, cache, cache_kwarg(model), compile=False)
            for _ in range(2):
                token = step(token)
            steps[name] = {"step": step, "token": token, "ms": [], "spent": collections.defaultdict(float)}
        for _ in range(args.rounds):
            for name, run in steps.items():
                SPENT.clear()
                TIMING[0] = True
                for _ in range(3):
                    with Timer(device) as timer:  # the step before ended synchronised too
                        run["token"] = run["step"](run["token"])
                    run["ms"].append(1e3 * timer.seconds)
                TIMING[0] = False
                for label, seconds in SPENT.items():
                    run["spent"][label] += seconds
        for context in reversed(sessions):
            context.__exit__(None, None, None)
    layers = model.config.num_hidden_layers
    full = statistics.median(steps[next(iter(steps))]["ms"]) if args.methods[0] == "full" else None
    for name, run in steps.items():
        ms = statistics.median(run["ms"])
        per_layer = ", ".join(f"{label} {1e6 * seconds / len(run['ms']) / layers:.0f}"
                              for label, seconds in sorted(run["spent"].items()))
        ratio = f"{full / ms:.2f}x full" if full else ""
        print(f"{name:<13} {ms:7.1f} ms/step {ratio:>11}  µs/layer: {per_layer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
