"""Triton-vs-torch agreement checks for rocketkv.core.kernels' sparse decode attention.

On CPU this must run with TRITON_INTERPRET=1 set before triton is imported, so
tests/test_kernels.py launches it as a subprocess:

    TRITON_INTERPRET=1 python tests/triton_interpret_check.py --kernel sparse_decode

On CUDA the test module imports it and calls run_checks("cuda", ...) directly.
The input builders are shared with tests/test_kernels.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}  # bfloat16: CUDA only
# (batch, kv_heads, group, head_dim, stored_tokens, selected)
SPARSE_CASES = [
    (1, 2, 1, 32, 37, 37),
    (2, 3, 4, 32, 129, 100),
    (1, 2, 4, 64, 300, 129),
    (1, 1, 2, 16, 40, 1),
]


def make_sparse_inputs(batch, kv_heads, group, head_dim, stored, selected, dtype, device, seed=0):
    """Random q/K/V and indices [B,Hkv,k] with -1 padding, including one fully padded row."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads, group, head_dim, generator=gen)
    keys = torch.randn(batch, kv_heads, stored, head_dim, generator=gen)
    values = torch.randn(batch, kv_heads, stored, head_dim, generator=gen)
    indices = torch.stack(
        [torch.randperm(stored, generator=gen)[:selected] for _ in range(batch * kv_heads)]
    ).view(batch, kv_heads, selected)
    padding = torch.rand(batch, kv_heads, selected, generator=gen) < 0.3
    indices = indices.masked_fill(padding, -1)
    indices[0, 0, 0] = 0  # at least one valid entry in the first row, whatever the draw
    if batch * kv_heads > 1:
        indices[-1, -1, :] = -1
    return (
        q.to(device, dtype),
        keys.to(device, dtype),
        values.to(device, dtype),
        indices.to(device),
    )


def _compare(name, got, want, atol):
    error = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    ok = got.shape == want.shape and got.dtype == want.dtype and error <= atol
    return ok, f"{'ok  ' if ok else 'FAIL'} {name}: shape={tuple(got.shape)} dtype={got.dtype} max_err={error:.2e} atol={atol:g}"


def check_sparse_decode(device, dtype):
    from rocketkv.core import kernels

    results = []
    for case in SPARSE_CASES:
        q, keys, values, indices = make_sparse_inputs(*case, dtype, device)
        scale = case[3] ** -0.5
        want = kernels.sparse_decode_attention(q, keys, values, indices, scale, backend="torch")
        got = kernels.sparse_decode_attention(q, keys, values, indices, scale, backend="triton")
        results.append(_compare(f"sparse_decode_attention{case} {dtype}", got, want, TOLERANCE[dtype]))

    # K/V stored token-major [B, S, Hkv, d] and viewed as [B, Hkv, S, d].
    q, keys, values, indices = make_sparse_inputs(2, 2, 2, 32, 70, 33, dtype, device)
    keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
    values = values.transpose(1, 2).contiguous().transpose(1, 2)
    want = kernels.sparse_decode_attention(q, keys, values, indices, 0.2, backend="torch")
    got = kernels.sparse_decode_attention(q, keys, values, indices, 0.2, backend="triton")
    results.append(_compare(f"sparse_decode_attention strided {dtype}", got, want, TOLERANCE[dtype]))

    # Few chunks per head, so each program runs the online softmax over several tiles.
    from rocketkv.core.kernels import triton_decode

    q, keys, values, indices = make_sparse_inputs(1, 2, 4, 32, 200, 150, dtype, device, seed=3)
    want = kernels.sparse_decode_attention(q, keys, values, indices, 0.15, backend="torch")
    got = triton_decode.sparse_decode_attention(q, keys, values, indices, 0.15, max_chunks_per_head=3)
    results.append(_compare(f"sparse_decode_attention multi-tile chunks {dtype}", got, want, TOLERANCE[dtype]))
    return results


CHECKS = {"sparse_decode": check_sparse_decode}


def run_checks(device, kernel="all", dtypes=(torch.float32, torch.float16)):
    """Run the named checks; returns (all_ok, report lines)."""
    names = list(CHECKS) if kernel == "all" else [kernel]
    results = [r for name in names for dtype in dtypes for r in CHECKS[name](device, dtype)]
    return all(ok for ok, _ in results), [line for _, line in results]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=["all", *CHECKS], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("triton kernels on CPU need TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    all_ok, lines = run_checks(args.device, args.kernel)
    print("\n".join(lines))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
