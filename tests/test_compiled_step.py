"""method.compile: a decode step whose decoder layers run through torch.compile decodes the eager step's tokens and
statistics, also when replayed with its host state frozen (what a CUDA graph of it does).  Skipped where inductor
cannot build CPU kernels (no C++ compiler)."""
import copy
import shutil

import pytest
import torch

from conftest import peaky_model
from rocketkv.core import compress, make_method
from rocketkv.core.graphs import DecodeStep, use_compile
from rocketkv.harness.generation import decode, prefill
from rocketkv.harness.models import tiny_tokenizer
from test_decode_step import MAX_NEW, FrozenHostReplay, greedy, prompts


def _inductor_can_run() -> bool:
    if not any(shutil.which(c) for c in ("c++", "g++", "gcc", "cc", "clang")):
        return False
    try:
        import torch._inductor  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _inductor_can_run(), reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
@pytest.mark.parametrize("method,budget", [("full", None), ("rocketkv", 32)])
def test_a_compiled_step_gives_the_eager_tokens(method, budget):
    eager_tokens, eager_stats = greedy(DecodeStep, method, budget, {"compile": "off"})
    tokens, stats = greedy(DecodeStep, method, budget, {"compile": "on"})
    replay_tokens, replay_stats = greedy(FrozenHostReplay, method, budget, {"compile": "on"})
    assert tokens == eager_tokens and replay_tokens == eager_tokens
    assert stats == eager_stats and replay_stats == eager_stats


def test_compile_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (use_compile("auto", cpu), use_compile("auto", cuda), use_compile("on", cpu), use_compile("off", cuda)) \
        == (False, False, True, False)
    with pytest.raises(ValueError, match="compile='yes' is not valid; use auto, on or off"):
        use_compile("yes", cpu)
    with pytest.raises(ValueError, match="method 'full': compile='fast' is not valid; use auto, on or off"):
        make_method("full", compile="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("method,budget", [("full", None), ("rocketkv", 32)])
def test_a_compiled_graph_replay_on_cuda_gives_the_eager_tokens_in_fewer_kernels(method, budget):
    model, rows = copy.deepcopy(peaky_model()).to("cuda"), prompts(1, 1)

    def run(compiled, graphs):
        with compress(model, method, budget, max_new_tokens=MAX_NEW, compile=compiled) as session:
            cache = session.new_cache(MAX_NEW, prompt_len=len(rows[0]))
            logits, _ = prefill(model, rows, cache, split_last=True)
            return decode(model, tiny_tokenizer(), logits, cache, MAX_NEW, ignore_eos=True, cuda_graphs=graphs)

    eager, replayed, compiled = run("off", False), run("off", True), run("on", True)
    assert replayed.tokens == eager.tokens and compiled.tokens == eager.tokens
    assert eager.kernels_per_step is None and 0 < compiled.kernels_per_step < replayed.kernels_per_step
