"""rocketkv.core.kernels: torch path vs naive per-head references, triton path vs torch path.

Triton on CPU runs in a subprocess with TRITON_INTERPRET=1 (it must be set before
triton is imported, and this module must not change global state). On CUDA the
same comparisons run directly on the device.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SUBPROCESS_TIMEOUT

from rocketkv.core import kernels

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = Path(__file__).resolve().parent / "triton_interpret_check.py"


def _load_check_module():
    # Loaded by path so it works whether or not tests/ is a package.
    spec = importlib.util.spec_from_file_location("triton_interpret_check", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_check = _load_check_module()
make_sparse_inputs, run_checks = _check.make_sparse_inputs, _check.run_checks
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
# The CUDA cases show as skipped without a GPU (benchmarks/gpu_check.sh runs this module on one).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]

# (batch, kv_heads, group, head_dim, stored_tokens, selected)
SPARSE_SHAPES = [
    (1, 2, 1, 16, 37, 37),
    (2, 3, 4, 32, 129, 100),
    (2, 3, 4, 24, 100, 37),
    (1, 2, 4, 32, 300, 129),
]


def naive_attention(q, keys, values, scale, slots_per_head):
    """slots_per_head(b, h, i) -> list of slot ids attended by query head i of KV head h."""
    batch, kv_heads, group, head_dim = q.shape
    out = torch.zeros(batch, kv_heads, group, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            for i in range(group):
                slots = slots_per_head(b, h, i)
                if not slots:
                    continue
                k = keys[b, h, slots].double()
                v = values[b, h, slots].double()
                weights = torch.softmax(scale * (k @ q[b, h, i].double()), dim=0)
                out[b, h, i] = weights @ v
    return out


def naive_sparse_attention(q, keys, values, indices, scale):
    return naive_attention(
        q, keys, values, scale, lambda b, h, i: [s for s in indices[b, h].tolist() if s >= 0]
    )


def _close(got, want, atol, rtol=1e-4):
    torch.testing.assert_close(got.cpu().double(), want.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=str)
def test_sparse_decode_attention_torch(device, shape):
    q, keys, values, indices = make_sparse_inputs(*shape, torch.float32, device)
    scale = shape[3] ** -0.5
    got = kernels.sparse_decode_attention(q, keys, values, indices, scale, backend="torch")
    assert got.dtype == q.dtype and got.shape == q.shape
    want = naive_sparse_attention(q.cpu(), keys.cpu(), values.cpu(), indices.cpu(), scale)
    _close(got, want, atol=1e-5)
    if shape[0] * shape[1] > 1:  # the builder pads the last row completely
        assert torch.all(got[-1, -1] == 0)


def test_sparse_decode_attention_with_nothing_selected_returns_zeros():
    q, keys, values, _ = make_sparse_inputs(1, 2, 4, 16, 5, 1, torch.float32, "cpu")
    no_slots = torch.empty(1, 2, 0, dtype=torch.long)
    out = kernels.sparse_decode_attention(q, keys, values, no_slots, 0.25, backend="torch")
    assert out.shape == q.shape and torch.all(out == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_decode_attention_torch_half(device, dtype):
    q, keys, values, indices = make_sparse_inputs(2, 3, 4, 32, 129, 100, dtype, device)
    got = kernels.sparse_decode_attention(q, keys, values, indices, 0.2, backend="torch")
    assert got.dtype == dtype
    want = naive_sparse_attention(q.cpu(), keys.cpu(), values.cpu(), indices.cpu(), 0.2)
    _close(got, want, atol=2e-2, rtol=2e-2)


def test_sparse_with_all_slots_matches_dense():
    q, keys, values, _ = make_sparse_inputs(1, 2, 4, 32, 37, 1, torch.float32, "cpu")
    every_slot = torch.arange(37).expand(1, 2, 37).contiguous()
    sparse = kernels.sparse_decode_attention(q, keys, values, every_slot, 0.2, backend="torch")
    dense = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=0.2)  # g heads as query rows
    _close(sparse, dense, atol=1e-6)


def test_auto_backend_on_cpu_is_torch_and_bad_backend_raises():
    q, keys, values, indices = make_sparse_inputs(1, 2, 4, 16, 9, 4, torch.float32, "cpu")
    auto = kernels.sparse_decode_attention(q, keys, values, indices, 0.2)
    assert torch.equal(auto, kernels.sparse_decode_attention(q, keys, values, indices, 0.2, backend="torch"))
    with pytest.raises(ValueError, match="backend"):
        kernels.sparse_decode_attention(q, keys, values, indices, 0.2, backend="cuda")


def _run_python(args, extra_env):
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )


def _passes_without(module: str, *lines: str) -> None:
    """``lines`` of Python run in a fresh interpreter where ``module`` cannot be imported, and pass."""
    result = _run_python(["-c", "\n".join([f"import sys; sys.modules[{module!r}] = None", *lines])], {})
    assert result.returncode == 0, result.stderr


def test_package_imports_without_triton():
    _passes_without("triton",
                    "import torch, rocketkv.core.kernels as k",
                    "assert not k.triton_available()",
                    "q = torch.randn(1, 1, 2, 16); keys = torch.randn(1, 1, 5, 16)",
                    "out = k.sparse_decode_attention(q, keys, keys, torch.tensor([[[0, 3, -1]]]), 0.25)",
                    "assert out.shape == q.shape")


def test_cpu_kernels_fall_back_to_torch_without_numba():
    _passes_without("numba",
                    "import torch, pytest, rocketkv.core.kernels as k",
                    "scores = torch.randn(1, 2, 50)",
                    "assert not k.use_numba('auto', scores)",
                    "idx, count, _ = k.select_units(scores, torch.tensor(40), 1, 5, 5, False)",
                    "assert idx.shape == (1, 2, 5) and count.tolist() == [[5, 5]]",
                    "with pytest.raises(RuntimeError, match='numba is not importable'):",
                    "    k.use_numba('numba', scores)")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed; the triton backend cannot be checked")
@pytest.mark.skipif(HAS_CUDA, reason="CUDA is here: the compiled kernels are checked instead of the interpreter")
def test_triton_matches_torch_in_interpreter():
    result = _run_python([str(CHECK_SCRIPT), "--kernel", "sparse_decode", "--device", "cpu"],
                         {"TRITON_INTERPRET": "1"})
    if result.returncode and "only 0-dimensional arrays can be converted" in result.stderr:
        import numpy
        import triton

        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run with numpy {numpy.__version__} and "
                    "rocketkv.core.kernels.interpreter found no hook to patch it")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs CUDA and triton")
def test_triton_matches_torch_on_cuda():
    all_ok, lines = run_checks("cuda", "sparse_decode", dtypes=(torch.float32, torch.float16, torch.bfloat16))
    assert all_ok, "\n".join(lines)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs CUDA and triton")
def test_auto_backend_on_cuda_uses_triton_and_falls_back_for_odd_head_dim():
    q, keys, values, indices = make_sparse_inputs(1, 2, 4, 24, 40, 17, torch.float16, "cuda")
    got = kernels.sparse_decode_attention(q, keys, values, indices, 0.2)
    want = kernels.sparse_decode_attention(q, keys, values, indices, 0.2, backend="torch")
    torch.testing.assert_close(got, want)
