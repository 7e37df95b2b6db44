"""The decode step with its decoder layers through torch.compile (``method.compile=on``) against the eager step, in
one process, steps interleaved so both see the same machine and almost the same cache.

    python benchmarks/decode_compile.py [--model smollm2-135m] [--length 2000] [--steps 20] [--methods full rocketkv]

For each method: a random prompt of --length tokens is prefilled once, then one ``DecodeStep`` runs 2 x --steps
steps alternating compiled and eager layers (the first compiled call, which compiles, is left out); it prints the
median ms per step of each and their ratio.  Tokens are not compared here (each step feeds the previous one's):
tests/test_compiled_step.py checks that a compiled decode gives the eager tokens.  On CUDA the steps run eagerly
(no CUDA graph), which is where compiling saves launches too.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocketkv.core import compress  # noqa: E402
from rocketkv.core.graphs import DecodeStep, compiled_layers  # noqa: E402
from rocketkv.core.session import cache_kwarg  # noqa: E402
from rocketkv.harness.generation import prefill  # noqa: E402
from rocketkv.harness.models import load_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model/*.yaml name")
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["full", "rocketkv"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{args.model}.yaml")
    model, _ = load_model(cfg)
    device = model.device
    prompt = [random.Random(0).randrange(100, 10_000) for _ in range(args.length)]
    print(f"{args.model} on {device}, prompt {args.length} tokens, {args.steps} steps of each kind, interleaved")
    print(f"{'method':<14} {'eager ms':>9} {'compiled ms':>11} {'eager/compiled':>14}")
    for name in args.methods:
        budget = None if name == "full" else args.budget
        new = 2 * args.steps + 3
        with compress(model, name, budget, max_new_tokens=new) as session:
            cache = session.new_cache(new, prompt_len=args.length)
            logits, _ = prefill(model, [prompt], cache, split_last=True)
            step = DecodeStep(model, cache, cache_kwarg(model), compile=False)
            layers = compiled_layers(model)
            token = logits.argmax(-1)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(2 * args.steps + 2):
                compiled = i % 2 == 1
                step.compiled = layers if compiled else None
                sync(device)
                start = time.perf_counter()
                token = step(token)
                sync(device)
                if i >= 2:  # the first compiled call compiles
                    times[compiled].append(1e3 * (time.perf_counter() - start))
        eager, fast = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:<14} {eager:>9.2f} {fast:>11.2f} {eager / fast:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
