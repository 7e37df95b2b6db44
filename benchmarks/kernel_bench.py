"""Time the decode kernels the way a decode step runs them: many calls replayed inside one CUDA graph.

Two kinds of rows, Llama-3.1-8B heads (8 KV heads, g=4, d=128):
- kernels that move real bytes: full KV's dense decode attention over every slot at each --contexts length and
  each --batches size.  GB/s = the bytes it must read (K and V of the live slots, q, the output) / time; x floor =
  time / those bytes at --peak-gbps (by default a device-to-device copy's bandwidth measured in the run);
- small kernels (sparse attention over --budget selected slots, the page scores at --context): us per call only,
  no bytes floor (at these sizes a launch costs more than the bytes).
Each row times the Triton kernel and its torch reference (both replayed in a graph of --calls calls) and their
largest difference.  Needs CUDA; without it, it says so and times the torch path eagerly at a tiny size (exit 0).
--json PATH also writes the rows.

    python benchmarks/kernel_bench.py [--contexts 32768,65536,98304 --batches 1,8 --context 32768 --budget 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from evals.efficiency.floor import copy_bandwidth
from rocketkv.core import kernels

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128


@dataclass
class KernelCase:
    name: str
    context: int
    batch: int
    floor_bytes: int | None  # None: a small kernel, reported as us per call
    run: Callable[[str], torch.Tensor]


def _randn(gen, device, dtype, *shape):
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def dense_cases(args, dtype, device) -> list[KernelCase]:
    cases = []
    elt = torch.empty((), dtype=dtype).element_size()
    for batch in args.batches:
        for context in args.contexts:
            gen = torch.Generator(device=device).manual_seed(0)
            q = _randn(gen, device, dtype, batch, KV_HEADS, GROUP, HEAD_DIM)
            keys = _randn(gen, device, dtype, batch, KV_HEADS, context + 64, HEAD_DIM)  # room for new tokens
            values = _randn(gen, device, dtype, batch, KV_HEADS, context + 64, HEAD_DIM)
            upto = torch.tensor(context, device=device)
            floor = batch * KV_HEADS * (2 * context * HEAD_DIM + 2 * GROUP * HEAD_DIM) * elt
            cases.append(KernelCase("dense_decode_attention", context, batch, floor,
                                    lambda backend, q=q, k=keys, v=values, u=upto:
                                    kernels.dense_decode_attention(q, k, v, u, HEAD_DIM**-0.5, backend=backend)))
    return cases


def small_cases(args, dtype, device) -> list[KernelCase]:
    """RocketKV's and Quest's step kernels as the methods call them (page probabilities / bounds from the page
    tables, the page selection), and the sparse attention over the selected slots."""
    batch, n, page_size = 1, args.context, args.page_size
    pages = -(-n // page_size)
    gen = torch.Generator(device=device).manual_seed(0)
    q = _randn(gen, device, dtype, batch, KV_HEADS, GROUP, HEAD_DIM)
    first, second = (_randn(gen, device, dtype, batch, KV_HEADS, HEAD_DIM, pages) for _ in range(2))
    page_min_t, page_max_t = torch.minimum(first, second), torch.maximum(first, second)
    upto = torch.tensor(n, device=device)
    probs = torch.rand(batch, KV_HEADS, pages, generator=gen, device=device)
    keys, values = (_randn(gen, device, dtype, batch, KV_HEADS, n, HEAD_DIM) for _ in range(2))
    indices = torch.rand(batch, KV_HEADS, n, generator=gen, device=device).topk(args.budget, -1).indices
    k = args.budget // 2
    return [
        KernelCase("hsa_page_probs", n, batch, None, lambda backend: kernels.hsa_page_probs(
            q, page_min_t, page_max_t, upto, page_size, args.channels, backend=backend)),
        KernelCase("quest_group_scores", n, batch, None, lambda backend: kernels.quest_group_scores(
            q, page_min_t, page_max_t, upto, page_size, backend=backend)),
        KernelCase("select_units (pages)", n, batch, None, lambda backend: kernels.select_units(
            probs, upto, page_size, k, k, True, backend=backend)),
        KernelCase("sparse_decode_attention", n, batch, None, lambda backend: kernels.sparse_decode_attention(
            q, keys, values, indices, HEAD_DIM**-0.5, backend=backend)),
    ]


def graph_us_per_call(fn: Callable[[], object], calls: int, replays: int = 5) -> float:
    """us per call of ``fn`` with ``calls`` calls captured in one CUDA graph, the best of ``replays`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compilation and library set-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    del graph
    return best


def eager_us_per_call(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e6 / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,65536,98304", help="dense decode lengths")
    parser.add_argument("--batches", default="1,8", help="dense decode batch sizes")
    parser.add_argument("--context", type=int, default=32768, help="the small kernels' cache length")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32, help="r, HSA's channels")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--calls", type=int, default=20, help="calls captured in one graph")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="bandwidth of the x floor and %% peak columns (default: a device-to-device copy "
                             "measured in this run, counting bytes read and written)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]

    on_cuda = torch.cuda.is_available() and kernels.triton_available()
    if on_cuda:
        device, backends = "cuda", ("torch", "triton")
    else:
        print("CUDA with triton is not available: the Triton kernels cannot be timed here.")
        print("Timing the torch path only, eagerly, at a tiny size (context 2048, batch 1, budget 64).\n")
        device, backends = "cpu", ("torch",)
        args.contexts, args.batches, args.context, args.budget = [2048], [1], 2048, 64
    if args.peak_gbps is None:
        args.peak_gbps = copy_bandwidth(torch.device(device)) / 1e9
    timer = (lambda fn: graph_us_per_call(fn, args.calls)) if on_cuda else \
        (lambda fn: eager_us_per_call(fn, args.calls))

    print(f"Hkv={KV_HEADS} g={GROUP} d={HEAD_DIM} device={device}; "
          f"{'us per call with ' + str(args.calls) + ' calls replayed in one CUDA graph' if on_cuda else 'eager'}")
    print(f"GB/s = bytes the kernel must read and write / time; x floor = time / those bytes at {args.peak_gbps:g} "
          "GB/s (copy bandwidth); small kernels: us per call only\n")
    header = (f"{'kernel':<24} {'dtype':<9} {'len':>6} {'B':>2} {'MB':>8} {'torch us':>9} {'triton us':>9} "
              f"{'GB/s':>7} {'% peak':>6} {'x floor':>7} {'torch/triton':>12} {'max err':>8}")
    print(header)
    print("-" * len(header))
    records = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for case in dense_cases(args, dtype, device) + small_cases(args, dtype, device):
            times = {backend: timer(lambda: case.run(backend)) for backend in backends}
            record = {"kernel": case.name, "dtype": dtype_name, "device": device, "context": case.context,
                      "batch": case.batch, "budget": args.budget, "floor_bytes": case.floor_bytes,
                      "peak_gbps": args.peak_gbps, "torch_us": times["torch"], "calls_per_graph": args.calls}
            cells = {"MB": "-", "triton": "-", "gbps": "-", "peak": "-", "floor": "-", "ratio": "-", "err": "-"}
            us = times.get("triton", times["torch"])
            if case.floor_bytes:
                floor_us = case.floor_bytes / (args.peak_gbps * 1e3)
                gbps = case.floor_bytes / (us * 1e3)
                record.update(floor_us=floor_us, gbps=gbps)
                cells.update(MB=f"{case.floor_bytes / 1e6:.1f}", gbps=f"{gbps:.0f}",
                             peak=f"{100 * gbps / args.peak_gbps:.0f}%", floor=f"{us / floor_us:.2f}x")
            if "triton" in times:
                error = (case.run("triton").float() - case.run("torch").float()).abs().max().item()
                record.update(triton_us=times["triton"], max_err=error,
                              torch_over_triton=times["torch"] / times["triton"])
                cells.update(triton=f"{times['triton']:.1f}", ratio=f"{times['torch'] / times['triton']:.2f}x",
                             err=f"{error:.1e}")
            records.append(record)
            print(f"{case.name:<24} {dtype_name:<9} {case.context:>6} {case.batch:>2} {cells['MB']:>8} "
                  f"{times['torch']:>9.1f} {cells['triton']:>9} {cells['gbps']:>7} {cells['peak']:>6} "
                  f"{cells['floor']:>7} {cells['ratio']:>12} {cells['err']:>8}")
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
