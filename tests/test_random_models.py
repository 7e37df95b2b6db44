"""Real architectures with random weights (``model=llama3.1-8b-random`` ...): their numbers against the published
configs and parameter counts, built on the meta device; the build path at a small size; refused by accuracy tasks."""
import pytest
import torch
import yaml

from conftest import REPO
from rocketkv.core import check_model
from rocketkv.harness.models import ModelSpec, architecture_config, load_model

RANDOM_MODELS = {  # name: (layers, heads, KV heads, head dim, hidden, intermediate, vocab, RoPE theta, max length)
    "llama3.1-8b-random": (32, 32, 8, 128, 4096, 14336, 128256, 500000.0, 131072),
    "mistral-7b-v0.2-random": (32, 32, 8, 128, 4096, 14336, 32000, 1e6, 32768),
    "qwen2.5-7b-random": (28, 28, 4, 128, 3584, 18944, 152064, 1e6, 32768),
}


def spec_of(name, **overrides):
    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    cfg.update(overrides)
    return ModelSpec.from_cfg(cfg)


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_architecture_matches_the_published_model_on_the_meta_device(name):
    from transformers import AutoModelForCausalLM

    spec = spec_of(name)
    config = architecture_config(spec)
    layers, heads, kv_heads, head_dim, hidden, intermediate, vocab, theta, max_len = RANDOM_MODELS[name]
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (layers, heads, kv_heads)
    assert (getattr(config, "head_dim", None) or config.hidden_size // heads) == head_dim
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (hidden, intermediate, vocab)
    assert config.rope_parameters["rope_theta"] == theta and config.max_position_embeddings == max_len == spec.max_len
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == spec.parameters
    check_model(model)  # full attention, RoPE: rocketkv can compress it
    if name.startswith("llama"):
        assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0


SMALL = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def test_weights_are_made_in_the_target_dtype_from_the_seed_and_the_count_is_checked():
    spec = ModelSpec(name="small-random", source="random_weights", max_len=4096, architecture=SMALL,
                     parameters=2 * 1024 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64,
                     dtype="bfloat16")
    model, tok = load_model(spec)
    again, _ = load_model(spec)
    assert model.dtype == torch.bfloat16 and len(tok) == 1024
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = load_model(ModelSpec(**{**spec.__dict__, "seed": 1}))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    with pytest.raises(ValueError, match=r"has 205,120 parameters, the yaml says 7"):
        load_model(ModelSpec(**{**spec.__dict__, "parameters": 7}))


@pytest.mark.parametrize("task", ["needle", "longbench", "ruler"])
def test_accuracy_tasks_refuse_random_weights(compose_cfg, tmp_path, monkeypatch, task):
    import rocketkv.harness.runner as runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=f"model=llama3.1-8b-random has random weights .* task={task} measures "
                                         "accuracy; use task=efficiency"):
        runner.run(compose_cfg("model=llama3.1-8b-random", f"task={task}", f"output_dir={tmp_path}"))


def test_the_efficiency_task_runs_a_random_architecture(compose_cfg, tmp_path):
    from rocketkv.harness.runner import run

    arch = [f"model.architecture.{k}={v}" for k, v in SMALL.items() if k != "rope_parameters"]  # a small llama
    results = run(compose_cfg("model=llama3.1-8b-random", "task=efficiency", "task.lengths=[256]",
                              "task.max_new_tokens=4", "grid.methods=[full,rocketkv]", "grid.budgets=[64]",
                              "model.parameters=null", "model.max_len=4096", "model.dtype=float32",
                              *arch, f"output_dir={tmp_path}",
                              "update_leaderboard=false", "progress=false"))
    assert [m["run"]["method"] for m in results] == ["full", "rocketkv"]
    assert all(m["efficiency"]["256"]["decode_tokens_per_s"] > 0 for m in results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_weights_are_made_on_the_gpu_in_the_target_dtype():
    spec = ModelSpec(name="small-random", source="random_weights", max_len=4096, architecture=SMALL,
                     dtype="bfloat16", device="cuda")
    torch.cuda.reset_peak_memory_stats()
    model, _ = load_model(spec)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert {p.device.type for p in model.parameters()} == {"cuda"} and model.dtype == torch.bfloat16
    assert torch.cuda.max_memory_allocated() < 3 * weights  # no float32 copy on the device either
    cpu, _ = load_model(ModelSpec(**{**spec.__dict__, "device": "cpu"}))
    assert cpu.lm_head.weight.dtype == torch.bfloat16 and cpu.lm_head.weight.shape == model.lm_head.weight.shape
