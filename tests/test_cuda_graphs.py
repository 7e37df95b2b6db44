"""On a CUDA GPU (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs it): every method's decode replayed as a CUDA
graph gives the eager loop's tokens and statistics, through the Triton kernels the methods use on CUDA; and a run
with ``cuda_graphs=on`` writes the predictions of ``cuda_graphs=off``."""
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import peaky_model
from rocketkv.core import compress
from rocketkv.core.graphs import DecodeStep
from rocketkv.core.session import cache_kwarg
from rocketkv.harness.generation import decode, prefill
from rocketkv.harness.models import tiny_tokenizer
from test_decode_step import METHODS, MAX_NEW, prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_model():
    return copy.deepcopy(peaky_model()).to("cuda")


def run(model, method, budget, opts, graphs, rows):
    with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts) as session:
        cache = session.new_cache(MAX_NEW, prompt_len=len(rows[0]))
        logits, _ = prefill(model, rows, cache, split_last=True)
        out = decode(model, tiny_tokenizer(), logits, cache, MAX_NEW, ignore_eos=True, cuda_graphs=graphs)
    return out, session.release()


@pytest.mark.parametrize("method,budget,opts", METHODS)
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_replay_equals_eager(cuda_model, method, budget, opts, batch):
    rows = prompts(1, batch)
    eager, eager_stats = run(cuda_model, method, budget, opts, False, rows)
    graphed, graphed_stats = run(cuda_model, method, budget, opts, True, rows)
    assert graphed.setup_steps == 3 and graphed.steps == MAX_NEW - 1  # 2 warm-up steps, 1 capture, then replays
    assert graphed.tokens == eager.tokens
    assert graphed_stats == pytest.approx(eager_stats, rel=1e-6)


def test_the_decode_step_replays_without_host_reads(cuda_model, monkeypatch):
    rows = prompts(2)
    with compress(cuda_model, "rocketkv", 32, max_new_tokens=MAX_NEW) as session:
        cache = session.new_cache(MAX_NEW, prompt_len=90)
        logits, _ = prefill(cuda_model, rows, cache, split_last=True)
        step = DecodeStep(cuda_model, cache, cache_kwarg(cuda_model), graphs=True)
        token = logits.argmax(-1)
        for _ in range(4):
            token = step(token)
        assert step.graph is not None
        monkeypatch.setattr(torch.Tensor, "item", lambda *a: pytest.fail("a replay read the device"))
        for _ in range(3):
            token = step(token)
    assert session.stats()["decode_steps"] == 8


def test_a_graphed_run_writes_the_eager_runs_predictions(compose_cfg, tmp_path):
    from rocketkv.harness.runner import run as run_eval

    args = ["model=tiny-random", "model.device=cuda", "task=needle", "task.lengths=[300]", "task.depths=[0.5]",
            "update_leaderboard=false", "progress=false", "budget=64"]
    for method in ("full", "quest", "rocketkv"):
        results = {}
        for mode in ("off", "on"):
            [cell] = run_eval(compose_cfg(*args, f"method={method}", f"method.cuda_graphs={mode}",
                                          f"output_dir={tmp_path / mode}"))
            lines = Path(cell["run"]["results_dir"], "predictions.jsonl").read_text().splitlines()
            results[mode] = [(r["id"], r["prediction"], r["stats"]) for r in map(json.loads, lines)]
        assert results["on"] == results["off"], method
