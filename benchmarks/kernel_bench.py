"""Time the Triton decode kernels against their torch references.

Default shape: Llama-3.1-8B decode (8 KV heads, g=4, d=128) at a 32k context
with a 256-token budget. For each kernel it prints time, achieved GB/s over the
bytes-moved floor (every byte the kernel must read, plus its output), the floor
time (floor bytes at --peak-gbps, by default a device-to-device copy's bandwidth measured in the run), each backend's time as a multiple of it, and
the torch/triton time ratio. Needs CUDA; on CPU it says so and times the torch
path at a tiny size. --json PATH also writes the rows as JSON.

    python benchmarks/kernel_bench.py [--context 32768 --budget 256 --page-size 16 --channels 32] [--json out.json]
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


@dataclass
class KernelCase:
    name: str
    floor_bytes: int
    run: Callable[[str], torch.Tensor]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def build_cases(args, dtype, device) -> list[KernelCase]:
    batch, kv_heads, group, head_dim = args.batch, args.kv_heads, args.group, args.head_dim
    num_pages = args.context // args.page_size
    elt = _element_size(dtype)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q = randn(batch, kv_heads, group, head_dim)
    first, second = randn(batch, kv_heads, head_dim, num_pages), randn(batch, kv_heads, head_dim, num_pages)
    page_min_t, page_max_t = torch.minimum(first, second), torch.maximum(first, second)
    del first, second
    channel_scores = torch.rand(batch, kv_heads, head_dim, generator=gen, device=device)
    channels = channel_scores.topk(args.channels, dim=-1).indices
    signs = torch.where(torch.rand(batch, kv_heads, args.channels, generator=gen, device=device) > 0.5, 1.0, -1.0)
    signs = signs.to(dtype)
    keys = randn(batch, kv_heads, args.context, head_dim)
    values = randn(batch, kv_heads, args.context, head_dim)
    slot_scores = torch.rand(batch, kv_heads, args.context, generator=gen, device=device)
    indices = slot_scores.topk(args.budget, dim=-1).indices
    scale = head_dim**-0.5

    heads = batch * kv_heads
    score_out_bytes = heads * group * num_pages * 4
    return [
        KernelCase(
            "rocketkv_page_scores",
            heads * (group * args.channels * elt + args.channels * (8 + elt + num_pages * elt)) + score_out_bytes,
            lambda backend: kernels.rocketkv_page_scores(q, page_min_t, page_max_t, channels, signs, backend=backend),
        ),
        KernelCase(
            "quest_page_scores",
            heads * (group * head_dim * elt + 2 * head_dim * num_pages * elt) + score_out_bytes,
            lambda backend: kernels.quest_page_scores(q, page_min_t, page_max_t, backend=backend),
        ),
        KernelCase(
            "sparse_decode_attention",
            heads * (2 * group * head_dim * elt + args.budget * (8 + 2 * head_dim * elt)),
            lambda backend: kernels.sparse_decode_attention(q, keys, values, indices, scale, backend=backend),
        ),
    ]


def time_ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100)
    fn()
    repeats = 20
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32, help="r, channels kept by rocketkv_page_scores")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="bandwidth for the %%peak, floor us and x floor columns (default: a device-to-device "
                             "copy measured in this run, counting bytes read and written)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    on_cuda = torch.cuda.is_available() and kernels.triton_available()
    if on_cuda:
        device, backends = "cuda", ("torch", "triton")
    else:
        print("CUDA with triton is not available: the Triton kernels cannot be timed here.")
        print("Timing the torch path only, at a tiny size (context 2048, budget 64).\n")
        device, backends = "cpu", ("torch",)
        args.context, args.budget = 2048, 64
    if args.peak_gbps is None:
        args.peak_gbps = copy_bandwidth(torch.device(device)) / 1e9

    print(
        f"B={args.batch} Hkv={args.kv_heads} g={args.group} d={args.head_dim} context={args.context} "
        f"budget={args.budget} page={args.page_size} r={args.channels} device={device}"
    )
    print("floor = bytes each kernel must read plus its output; GB/s = floor / time; floor us = floor bytes at "
          f"{args.peak_gbps:g} GB/s; x floor = time / floor us\n")
    header = f"{'kernel':<24} {'dtype':<9} {'floor MB':>9} {'floor us':>8} {'torch us':>9} {'torch GB/s':>10} {'x floor':>8}"
    if "triton" in backends:
        header += (f" {'triton us':>9} {'triton GB/s':>11} {'% peak':>7} {'x floor':>8} {'torch/triton':>12}"
                   f" {'max err':>8}")
    print(header)
    print("-" * len(header))

    records = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for case in build_cases(args, dtype, device):
            times = {backend: time_ms(lambda: case.run(backend), device) for backend in backends}
            bandwidth = {backend: case.floor_bytes / (ms * 1e-3) / 1e9 for backend, ms in times.items()}
            floor_us = case.floor_bytes / (args.peak_gbps * 1e9) * 1e6
            record = {"kernel": case.name, "dtype": dtype_name, "device": device, "context": args.context,
                      "budget": args.budget, "floor_bytes": case.floor_bytes, "floor_us": floor_us,
                      "peak_gbps": args.peak_gbps, "torch_us": times["torch"] * 1e3}
            row = (
                f"{case.name:<24} {dtype_name:<9} {case.floor_bytes / 1e6:>9.3f} {floor_us:>8.2f} "
                f"{times['torch'] * 1e3:>9.1f} {bandwidth['torch']:>10.1f} {times['torch'] * 1e3 / floor_us:>7.1f}x"
            )
            if "triton" in backends:
                error = (case.run("triton").float() - case.run("torch").float()).abs().max().item()
                record.update(triton_us=times["triton"] * 1e3, max_err=error,
                              torch_over_triton=times["torch"] / times["triton"])
                row += (
                    f" {times['triton'] * 1e3:>9.1f} {bandwidth['triton']:>11.1f}"
                    f" {100 * bandwidth['triton'] / args.peak_gbps:>6.1f}%"
                    f" {times['triton'] * 1e3 / floor_us:>7.1f}x"
                    f" {times['torch'] / times['triton']:>11.2f}x {error:>8.1e}"
                )
            records.append(record)
            print(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
