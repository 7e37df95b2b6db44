"""Compile every Triton kernel of rocketkv.core.kernels for a GPU on this machine (no GPU needed) and report what
the GPU would run: registers, spills, the widest global load, asynchronous copies (cp.async / TMA), stages, warps.

Each kernel is specialised exactly as the JIT would at the GPU check's shapes (Llama-3.1-8B heads: 8 KV heads,
g=4, d=128; a 32k cache; batch 1; 16-bit K/V): the example calls below run the project's own launch wrappers on
CPU tensors with ``JITFunction.run`` replaced by a recorder, and every recorded launch is then bound and compiled
by the JIT's own binder against ``GPUTarget("cuda", 90, 32)`` (the triton wheel ships ptxas).  Kernels found in a
``rocketkv.core.kernels`` module that no example launches are listed as not covered: add an example for them.

    python benchmarks/kernel_aot.py [--arch 90] [--context 32768] [--batch 1] [--dtype bfloat16] [--json out.json]

Columns: regs = registers per thread; spill = spill stores + loads (bytes); widest ld = the widest ``ld.global``
in the PTX in bits (128 = 16-byte vector loads), and at the end every ``ld.global`` width with its count of
instructions (loads that go through cp.async are not among them); cp.async = asynchronous global->shared copies
(count of ``cp.async`` instructions in the PTX and their widest size in bytes); TMA = bulk tensor copies; smem =
shared memory bytes per program.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def examples(args) -> dict[str, Callable[[], object]]:
    """Calls of the launch wrappers at the check's shapes; each runs every kernel its wrapper launches."""
    from rocketkv.core import kernels

    dtype, (b, hkv, g, d, n) = getattr(torch, args.dtype), (args.batch, 8, 4, 128, args.context)
    budget = 256

    def rand(*shape, dt=dtype):
        return torch.randn(*shape).to(dt)

    q, keys, values = rand(b, hkv, g, d), rand(b, hkv, n, d), rand(b, hkv, n, d)
    selected = torch.rand(b, hkv, n).topk(budget, dim=-1).indices
    upto = torch.tensor(n - 50)
    return {
        "dense_decode_attention": lambda: kernels.dense_decode_attention(q, keys, values, upto, d**-0.5, "triton"),
        "sparse_decode_attention": lambda: kernels.sparse_decode_attention(q, keys, values, selected, d**-0.5,
                                                                           "triton"),
        **selection_examples(kernels, q, keys, upto, budget, rand),
    }


def selection_examples(kernels, q, keys, upto, budget: int, rand) -> dict[str, Callable[[], object]]:
    """The decode steps' selection kernels as the methods call them, with the methods' own plans at this length."""
    from rocketkv.core import make_method

    b, hkv, g, d = q.shape
    n = keys.shape[2]
    hsa = make_method("hsa", budget=budget).plan(n - 64, 64, d)
    quest = make_method("quest", budget=budget).plan(n - 64, 64, d)
    sparq = make_method("sparq", budget=budget).plan(n - 64, 64, d)
    p, q_p, k = hsa["page_size"], quest["page_size"], hsa["topk"]
    tables = {size: rand(b, hkv, d, -(-n // size)) for size in (p, q_p)}
    pages = torch.rand(b, hkv, tables[p].shape[-1])
    per_head = torch.rand(b, hkv * g, n)
    idx = torch.rand(b, hkv, g, n).topk(k, dim=-1).indices
    channels = torch.rand(b, hkv, g, d).topk(sparq["channels"], dim=-1).indices
    keys_by_channel = keys.transpose(2, 3).contiguous()  # SparQ's copy of K, [B, Hkv, d, C]
    value_sum = torch.zeros(b, hkv, d)  # and its running sum of V, fp32
    return {
        "fold_page_bounds": lambda: kernels.fold_page_bounds(keys, tables[p], tables[p], upto, p, "triton"),
        "fold_sparq_slot": lambda: kernels.fold_sparq_slot(keys, keys, keys_by_channel, value_sum, upto, "triton"),
        "hsa_page_probs": lambda: kernels.hsa_page_probs(q, tables[p], tables[p], upto, p, hsa["channels"],
                                                         "triton"),
        "quest_group_scores": lambda: kernels.quest_group_scores(q, tables[q_p], tables[q_p], upto, q_p, "triton"),
        "select_units (hsa pages)": lambda: kernels.select_units(pages, upto, p, k, k, True, backend="triton"),
        "select_units (slots per head, mass)": lambda: kernels.select_units(per_head, upto, 1, k, k, False,
                                                                             mass=True, backend="triton"),
        "slot_scores": lambda: kernels.slot_scores(q, keys, upto, backend="triton"),
        "slot_scores (sparq channels)": lambda: kernels.slot_scores(q, keys_by_channel.mT, upto, channels,
                                                                    backend="triton"),
        "union_reads": lambda: kernels.union_reads(idx, upto, 2 * d, n, channels, d, backend="triton"),
    }


def kernel_functions() -> dict[str, object]:
    """Every Triton kernel (``JITFunction``, possibly under autotune / heuristics) in rocketkv.core.kernels.triton_*
    (the other modules are the torch reference and the numba CPU kernels, whose numba may be absent)."""
    import rocketkv.core.kernels as package
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("triton_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            if isinstance(fn, JITFunction) and fn.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = fn
    # device functions (called from another kernel, never launched) compile inside their callers
    called = {name for fn in found.values() for name in re.findall(r"\b(\w+)\(", fn.src) if name != fn.__name__}
    return {key: fn for key, fn in found.items() if fn.__name__ not in called}


def recorded_launches(calls: dict[str, Callable[[], object]]) -> list[tuple[str, object, tuple, dict]]:
    """(example, kernel, args, kwargs) of every launch the examples make; nothing runs."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches, current = [], [""]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((current[0], self, args, kwargs))

    def every_config(self, *args, **kwargs):  # an autotuned kernel: compile each of its configs
        for config in self.configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = record, every_config
    try:
        for name, call in calls.items():
            current[0] = name
            call()
    finally:
        JITFunction.run, Autotuner.run = saved
    return launches


def compile_for(fn, args: tuple, kwargs: dict, target):
    """Compile ``fn`` for ``target`` with the specialisation (constexprs, divisibility, ints == 1) the JIT gives."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_usage(ptx: str, arch: str) -> tuple[int | None, int | None]:
    """(registers per thread, spill bytes stored + loaded) from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(int(arch.rstrip("a")[3:])).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", str(src), "-o", str(Path(tmp, "k.o"))],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return (int(regs.group(1)) if regs else None), sum(spills)


def ptx_memory_ops(ptx: str) -> dict:
    """A kernel's PTX: its ld.global widths (bits: count, the widest), cp.async copies (count, widest bytes), TMA."""
    widths = Counter(int(vec or 1) * int(bits) for vec, bits in
                     re.findall(r"\bld\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?\.[bsuf](\d+)\b", ptx))
    async_sizes = [int(size, 0) for size in re.findall(
        r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global\s[^,]+,[^,]+,\s*(0x[0-9a-f]+|\d+)", ptx)]
    return {"widest_ld_bits": max(widths, default=0),
            "ld_global": " ".join(f"{bits}x{n}" for bits, n in sorted(widths.items(), reverse=True)),
            "cp_async": len(async_sizes), "cp_async_bytes": max(async_sizes, default=0),
            "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                        help="K/V and query dtype (the check's model runs in bfloat16)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        print("triton is not installed: nothing to compile")
        return 0
    target = GPUTarget("cuda", args.arch, 32)
    arch = f"sm_{args.arch}{'a' if args.arch >= 90 else ''}"
    print(f"Triton kernels compiled for {arch} on this machine: B={args.batch} Hkv=8 g=4 d=128 "
          f"context={args.context} {args.dtype}\n")
    header = (f"{'call':<24} {'kernel':<30} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'widest ld':>9} "
              f"{'cp.async':>8} {'TMA':>3} {'smem':>6}  ld.global bits x count")
    print(header)
    print("-" * len(header))
    rows, seen = [], set()
    for example, fn, fargs, fkwargs in recorded_launches(examples(args)):
        kernel = compile_for(fn, fargs, fkwargs, target)
        meta = kernel.metadata
        key = (example, fn.__name__, str(fkwargs))
        if key in seen:
            continue
        seen.add(key)
        regs, spill = ptxas_usage(kernel.asm["ptx"], arch)
        row = {"kernel": fn.__name__, "example": example, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
               "registers": regs, "spill_bytes": spill, "shared_bytes": meta.shared,
               **ptx_memory_ops(kernel.asm["ptx"])}
        rows.append(row)
        copies = f"{row['cp_async']}x{row['cp_async_bytes']}B" if row["cp_async"] else "none"
        print(f"{example:<24} {row['kernel']:<30} {row['num_warps']:>5} {row['num_stages']:>6} {regs:>4} {spill:>5} "
              f"{row['widest_ld_bits']:>6}bit {copies:>8} {'yes' if row['tma'] else 'no':>3} {meta.shared:>6}  "
              f"{row['ld_global']}")
    launched = {fn for _, fn, _, _ in recorded_launches(examples(args))}
    missing = sorted(name for name, fn in kernel_functions().items() if fn not in launched)
    if missing:
        print(f"\nnot covered (no example launches them; add one to examples() here): {', '.join(missing)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
