"""The static decode step: what a replayed CUDA graph computes equals the eager loop, for every method.

A CUDA graph replays the kernels recorded at capture with the host values of that moment; Python does not run.
On CPU the same is emulated: every step after the first runs with the host state (the layers' and the
generation's Python attributes) rolled back to what it was at the first, then the true state comes back and
``GenerationState.advance`` does the host bookkeeping, as the graph runner does.  A step that read host state
(a Python slot count, say) would then compute with stale values and give other tokens.  ``test_cuda_graphs.py``
runs the real graphs on a GPU.
"""
import pytest
import torch

from conftest import peaky_model
from rocketkv.core import compress
from rocketkv.core.graphs import DecodeStep, use_cuda_graphs
from rocketkv.core.session import cache_kwarg
from rocketkv.harness.generation import prefill

METHODS = [("full", None, {}), ("topk", 32, {}), ("snapkv", 192, {"selection": "head"}),
           ("snapkv", 48, {"selection": "group"}), ("quest", 32, {}), ("sparq", 32, {}), ("rocketkv", 32, {}),
           ("rocketkv", 64, {"skip_layers": 1}), ("rocketkv_mt", 32, {}), ("hsa", 32, {}), ("quest", 16, {}),  # 16: Quest's page capped at k
           ("rocketkv", 32, {"split_ratio": 0.5}),
           ("rocketkv", 32, {"kernel_size": "auto", "adaptive_kernel_sizes": [[0, 15]]}),
           ("snapkv", 48, {"selection": "group", "kernel_size": "auto"})]
MAX_NEW = 12


def host_state(cache):
    objects = [*cache.layers, cache.layers[0].state, cache.layers[0].state.stats]
    return [(obj, dict(obj.__dict__), dict(getattr(obj, "meta", {}))) for obj in objects]


def restore(saved):
    for obj, attrs, meta in saved:
        obj.__dict__.clear()
        obj.__dict__.update(attrs)
        if hasattr(obj, "meta"):
            obj.meta.clear()
            obj.meta.update(meta)


class FrozenHostReplay(DecodeStep):
    """On CPU: each step after the first runs with the host state of the first (its 'capture')."""

    captured = None

    @torch.inference_mode()
    def __call__(self, tokens):
        self.tokens[:, 0].copy_(tokens)
        if self.captured is None:
            self.captured = host_state(self.cache)
            self._forward()
            restore(self.captured)  # from here on the host state moves only through advance, as after a capture
        else:
            live = host_state(self.cache)
            restore(self.captured)
            self._forward()
            restore(live)
        self.state.advance(1)
        self.steps += 1
        return self.next_tokens


def prompts(seed, batch=1):
    return torch.randint(3, 1000, (batch, 90), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(step_class, method, budget, opts, rows=None):
    model = peaky_model()
    rows = rows or prompts(0)
    with compress(model, method, budget, max_new_tokens=MAX_NEW, **opts) as session:
        cache = session.new_cache(MAX_NEW, prompt_len=90)
        logits, _ = prefill(model, rows, cache, split_last=True)
        step = step_class(model, cache, cache_kwarg(model))
        tokens = [logits.argmax(-1)]
        for _ in range(MAX_NEW - 1):
            tokens.append(step(tokens[-1]).clone())
    stats = session.release()
    return torch.stack(tokens, dim=1).tolist(), stats


@pytest.mark.parametrize("method,budget,opts", METHODS)
def test_a_replayed_step_equals_the_eager_loop(method, budget, opts):
    eager_tokens, eager_stats = greedy(DecodeStep, method, budget, opts)
    replay_tokens, replay_stats = greedy(FrozenHostReplay, method, budget, opts)
    assert replay_tokens == eager_tokens
    assert replay_stats == eager_stats
    assert eager_stats["decode_steps"] == MAX_NEW  # the last prompt token, then MAX_NEW - 1 fed tokens


@pytest.mark.parametrize("method,budget,opts", [METHODS[1], METHODS[4], METHODS[6]])
def test_a_batch_of_rows_decodes_each_row_as_alone(method, budget, opts):
    """Batch > 1 (``task.batch_size``): one cache row per prompt; each row's tokens are its own decode's."""
    rows = prompts(5, batch=3)
    together, stats = greedy(DecodeStep, method, budget, opts, rows)
    for row, tokens in zip(rows, together):
        assert greedy(DecodeStep, method, budget, opts, [row])[0] == [tokens]
    assert len(together) == 3 and stats["decode_steps"] == MAX_NEW


def test_the_emulation_catches_a_step_that_reads_host_state(monkeypatch):
    """Guards the emulation itself: a step whose slot count came from the host's (frozen at capture) decodes other
    tokens in the emulated replay than in the eager loop."""
    from rocketkv.core.methods.hsa import HybridSparseAttention  # RocketKV's decode step

    device_decode = HybridSparseAttention.decode

    def from_host(self, layer, q, upto, plan, scaling):
        return device_decode(self, layer, q, torch.tensor(layer.stored), plan, scaling)

    monkeypatch.setattr(HybridSparseAttention, "decode", from_host)
    eager, _ = greedy(DecodeStep, "rocketkv", 32, {})
    replay, _ = greedy(FrozenHostReplay, "rocketkv", 32, {})
    assert replay != eager


def test_graph_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (use_cuda_graphs("auto", cpu), use_cuda_graphs("auto", cuda), use_cuda_graphs("off", cuda)) == \
        (False, True, False)
    with pytest.raises(ValueError, match="cuda_graphs=on needs a CUDA device"):
        use_cuda_graphs("on", cpu)
    with pytest.raises(ValueError, match="cuda_graphs='yes' is not valid; use auto, on or off"):
        use_cuda_graphs("yes", cpu)


def test_rope_that_syncs_on_the_host_is_never_captured():
    from transformers import LlamaConfig

    from rocketkv.core.graphs import rope_types

    cuda = torch.device("cuda")
    dynamic = LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    llama3 = LlamaConfig(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    assert rope_types(dynamic) == {"dynamic"} and rope_types(llama3) == {"llama3"}
    assert rope_types(LlamaConfig()) == {"default"}
    assert use_cuda_graphs("auto", cuda, rope_types(llama3)) is True
    assert use_cuda_graphs("auto", cuda, rope_types(dynamic)) is False  # eager decode instead
    with pytest.raises(ValueError, match="cuda_graphs=on cannot capture this model's rope_type=dynamic.*auto or off"):
        use_cuda_graphs("on", cuda, rope_types(dynamic))
    with pytest.raises(ValueError, match="rope_type=longrope"):
        use_cuda_graphs("on", cuda, {"longrope"})
