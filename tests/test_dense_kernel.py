"""The dense decode kernel (full KV's step): attention over the contiguous slots [0, upto) against a per-head
float64 reference and SDPA.

On CPU the Triton kernel runs in the interpreter, in a subprocess (TRITON_INTERPRET=1 must be set before triton
is imported): ``TRITON_INTERPRET=1 python tests/test_dense_kernel.py``.  On CUDA the same checks run directly,
plus a CUDA-graph replay with ``upto`` advanced between replays.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}

# (batch, kv_heads, group, head_dim, capacity, upto, splits or None): odd groups, partial last tiles, upto below
# the capacity, one slot, more chunks than tiles (empty chunks), a group wider than one MMA tile.
SMALL_CASES = [
    (1, 2, 3, 16, 37, 29, None),
    (2, 3, 1, 32, 130, 130, None),
    (1, 1, 5, 64, 200, 1, None),
    (1, 2, 4, 32, 300, 257, 7),
    (2, 1, 2, 16, 70, 65, 16),
    (1, 3, 48, 64, 150, 99, 2),
]
# Llama-3.1-8B heads (32 query / 8 KV heads, d=128) with several thousand slots, batch 1 and 3.
LLAMA_CASES = [
    (1, 8, 4, 128, 6000, 5937, None),
    (3, 8, 4, 128, 4100, 3999, None),
]


def make_inputs(batch, kv_heads, group, head_dim, capacity, upto, dtype, device, seed=0, token_major=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads, group, head_dim, generator=gen)
    keys = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen)
    values = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen)
    keys[:, :, upto:] = 1e4  # slots past upto must not count: huge keys would dominate the softmax if they did
    if token_major:  # stored [B, C, Hkv, d], viewed [B, Hkv, C, d]
        keys, values = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (keys, values))
    return (q.to(device, dtype), keys.to(device, dtype), values.to(device, dtype),
            torch.tensor(upto, device=device))


def naive_dense(q, keys, values, upto, scale):
    """Per query head, in float64: softmax over the slots [0, upto)."""
    q, keys, values = q.double().cpu(), keys.double().cpu(), values.double().cpu()
    n = int(upto)
    weights = torch.softmax(scale * torch.einsum("bhgd,bhsd->bhgs", q, keys[:, :, :n]), dim=-1)
    return torch.einsum("bhgs,bhsd->bhgd", weights, values[:, :, :n])


@pytest.mark.parametrize("case", SMALL_CASES + LLAMA_CASES[:1], ids=str)
def test_torch_path_matches_per_head_reference(case):
    from rocketkv.core import kernels

    q, keys, values, upto = make_inputs(*case[:6], torch.float32, "cpu")
    got = kernels.dense_decode_attention(q, keys, values, upto, case[3] ** -0.5, backend="torch")
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), naive_dense(q, keys, values, upto, case[3] ** -0.5), atol=1e-5,
                               rtol=1e-4)


def check(device, dtypes, llama_dtypes=None) -> list[tuple[bool, str]]:
    """Triton against the float64 reference (and the torch path): the small cases in ``dtypes``, the Llama-sized
    ones in ``llama_dtypes`` (default: the same)."""
    from rocketkv.core import kernels
    from rocketkv.core.kernels import triton_dense

    results = []
    for dtype in dtypes:
        llama = LLAMA_CASES if dtype in (llama_dtypes or dtypes) else []
        cases = [(c, False) for c in SMALL_CASES + llama] + [(SMALL_CASES[3], True)]
        for (b, hkv, g, d, cap, n, splits), token_major in cases:
            q, keys, values, upto = make_inputs(b, hkv, g, d, cap, n, dtype, device, token_major=token_major)
            got = triton_dense.dense_decode_attention(q, keys, values, upto, d**-0.5, splits=splits)
            want = naive_dense(q, keys, values, upto, d**-0.5)
            error = (got.double().cpu() - want).abs().max().item()
            torch_path = kernels.dense_decode_attention(q, keys, values, upto, d**-0.5, backend="torch")
            error_torch = (got.float() - torch_path.float()).abs().max().item()
            ok = got.shape == q.shape and got.dtype == dtype and max(error, error_torch) <= TOLERANCE[dtype]
            name = f"{(b, hkv, g, d, cap, n, splits)}{' token-major' if token_major else ''} {dtype}"
            results.append((ok, f"{'ok  ' if ok else 'FAIL'} {name}: max err {error:.2e} (vs torch {error_torch:.2e})"))
    return results


def check_decode_steps() -> list[tuple[bool, str]]:
    """Full KV's greedy decode of the tiny model through the kernel (kernels=triton) gives the torch path's tokens
    and statistics, also replayed with its host state frozen (as a CUDA graph would: upto is read on the device)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rocketkv.core.graphs import DecodeStep
    from test_decode_step import FrozenHostReplay, greedy, prompts

    want = greedy(DecodeStep, "full", None, {"kernels": "torch"}, prompts(0, 2))
    results = []
    for step in (DecodeStep, FrozenHostReplay):
        got = greedy(step, "full", None, {"kernels": "triton"}, prompts(0, 2))
        ok = got == want
        results.append((ok, f"{'ok  ' if ok else 'FAIL'} full KV decode, kernels=triton, {step.__name__}: "
                            f"{'same' if ok else 'other'} tokens and statistics as kernels=torch"))
    return results


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1" and not HAS_CUDA:
        print("the triton kernel on CPU needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    # in the interpreter the Llama-sized cases run in float16 only (they take most of the time)
    results = check("cuda" if HAS_CUDA else "cpu", (torch.float32, torch.float16), (torch.float16,))
    if not HAS_CUDA:
        results += check_decode_steps()
    print("\n".join(line for _, line in results))
    return 0 if all(ok for ok, _ in results) else 1


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed; the triton backend cannot be checked")
def test_triton_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs CUDA and triton")
def test_triton_matches_reference_on_cuda():
    results = check("cuda", (torch.float32, torch.float16, torch.bfloat16))
    assert all(ok for ok, _ in results), "\n".join(line for _, line in results)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs CUDA and triton")
def test_cuda_graph_replay_follows_upto():
    """Captured once, replayed as upto grows: each replay equals a fresh eager call (no host read of upto)."""
    from rocketkv.core import kernels

    q, keys, values, upto = make_inputs(1, 8, 4, 128, 5000, 3000, torch.bfloat16, "cuda")
    keys[:, :, 3000:] = torch.randn_like(keys[:, :, 3000:])
    out = kernels.dense_decode_attention(q, keys, values, upto, 0.1)  # warm-up: compilation
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.dense_decode_attention(q, keys, values, upto, 0.1)
    for n in (3000, 3001, 4097, 5000):
        upto.fill_(n)
        graph.replay()
        want = kernels.dense_decode_attention(q, keys, values, torch.tensor(n, device="cuda"), 0.1, backend="torch")
        torch.testing.assert_close(out, want, atol=3e-2, rtol=3e-2)


if __name__ == "__main__":
    sys.exit(main())


def _kernel_aot():
    spec = importlib.util.spec_from_file_location("kernel_aot", REPO_ROOT / "benchmarks" / "kernel_aot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_every_triton_kernel_has_an_aot_example():
    """benchmarks/kernel_aot.py reports every kernel of rocketkv.core.kernels: each is launched by an example."""
    from argparse import Namespace

    aot = _kernel_aot()
    args = Namespace(batch=1, context=2048, dtype="bfloat16")
    launched = {fn for _, fn, _, _ in aot.recorded_launches(aot.examples(args))}
    kernels = aot.kernel_functions()
    assert "triton_dense._dense_decode_partial_kernel" in kernels
    assert sorted(name for name, fn in kernels.items() if fn not in launched) == []


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_dense_kernel_compiles_for_sm90_pipelined_without_spills():
    """Compiled for an H100/H200 as the JIT would at Llama-8B heads: cp.async K/V copies of 16 bytes, no spills, and
    small enough for the PROGRAMS_PER_SM the split assumes (registers and shared memory of an sm_90 SM)."""
    from rocketkv.core.kernels import triton_dense
    from argparse import Namespace

    from triton.backends.compiler import GPUTarget

    aot = _kernel_aot()
    calls = aot.examples(Namespace(batch=1, context=32768, dtype="bfloat16"))
    [(_, fn, args, kwargs), _] = aot.recorded_launches({"dense": calls["dense_decode_attention"]})
    assert fn.__name__ == "_dense_decode_partial_kernel"
    kernel = aot.compile_for(fn, args, kwargs, GPUTarget("cuda", 90, 32))
    ops = aot.ptx_memory_ops(kernel.asm["ptx"])
    registers, spills = aot.ptxas_usage(kernel.asm["ptx"], "sm_90a")
    assert ops["cp_async"] > 0 and ops["cp_async_bytes"] == 16 and spills == 0
    per_sm = triton_dense.PROGRAMS_PER_SM
    assert registers * 32 * triton_dense.NUM_WARPS * per_sm <= 65536  # registers per SM
    assert (kernel.metadata.shared + 1024) * per_sm <= 228 * 1024  # shared memory per SM (1 KiB reserved a block)
