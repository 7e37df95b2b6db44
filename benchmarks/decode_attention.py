"""Per-step decode attention time of each method vs full KV on synthetic K/V, next to the accounted bytes read.

    python benchmarks/decode_attention.py [--contexts 4096 8192 16384 32768] [--budget 256] [--steps 20]

Llama-3.1-8B attention shape (8 KV heads, g = 4, d = 128). Prints ratios measured in one run (machines are noisy).
"""
from __future__ import annotations

import argparse
import time

import torch

from rocketkv.core.attention import compress_layer
from rocketkv.core.cache import CompressedLayer
from rocketkv.core.methods import make_method
from rocketkv.core.state import GenerationState

METHODS = ("full", "topk", "snapkv", "quest", "sparq", "rocketkv")


def build_layer(method, k, v, q_window, max_new, scaling):
    state = GenerationState(method, max_new, None)
    layer = CompressedLayer(state, 0)
    layer.update(k, v)
    b, hkv, g = q_window.shape[:3]
    state.prompt_len, state.group_size, state.element_size = k.shape[2], g, k.element_size()
    state.plan = method.plan(k.shape[2], max_new, k.shape[-1], None, group_size=g)
    compress_layer(layer, q_window, k.shape[2], scaling)
    return layer, state


def time_decode(method, layer, state, q, steps, scaling):
    method.index(layer, state.plan)
    upto = torch.tensor(layer.stored, device=q.device)  # a decode step's slot count lives on the device
    method.decode(layer, q, upto, state.plan, scaling)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        out, cost = method.decode(layer, q, upto, state.plan, scaling)
    if q.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, cost


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hkv, g, d, max_new = 8, 4, 128, 128
    scaling = d ** -0.5
    gen = torch.Generator().manual_seed(0)
    print(f"device={args.device} dtype={dtype} Hkv={hkv} g={g} d={d} budget={args.budget} steps={args.steps}")
    print(f"{'context':>8} {'method':>9} {'ms/step':>9} {'time vs full':>12} {'MB read/step':>12} {'bytes vs full':>13}")
    for ctx in args.contexts:
        k = torch.randn(1, hkv, ctx, d, generator=gen).to(args.device, dtype)
        v = torch.randn(1, hkv, ctx, d, generator=gen).to(args.device, dtype)
        q_window = torch.randn(1, hkv, g, 32, d, generator=gen).to(args.device, dtype)
        q = torch.randn(1, hkv, g, d, generator=gen).to(args.device, dtype)
        full_time = full_bytes = None
        for name in METHODS:
            method = make_method(name, budget=args.budget)
            layer, state = build_layer(method, k, v, q_window, max_new, scaling)
            seconds, cost = time_decode(method, layer, state, q, args.steps, scaling)
            read = cost.elements * k.element_size()
            if method.is_reference:
                full_time, full_bytes = seconds, read
            print(f"{ctx:>8} {name:>9} {seconds * 1e3:>9.3f} {seconds / full_time:>12.2f} {read / 2**20:>12.2f} "
                  f"{read / full_bytes:>13.3f}")


if __name__ == "__main__":
    main()
