"""The GPU dtypes, proven on CPU: a model loaded through the harness in bf16/fp16 is the model stock
``from_pretrained(dtype=...)`` gives (rotary frequencies stay float32 on every load path), and full KV through
``rocketkv.compress`` generates exactly what stock ``generate`` does at a prompt long enough for RoPE's dtype to
matter."""
import importlib.util

import pytest
import torch
import yaml

from conftest import REPO, peaky_model
from rocketkv.core.session import compress
from rocketkv.harness.models import ModelSpec, load_model

PROMPT_LEN, MAX_NEW = 4200, 6
SMALL_LLAMA3 = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "max_position_embeddings": 16384,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}}


def rotary_buffers(model):
    return {name: buf for name, buf in model.named_buffers() if "rotary" in name}


@pytest.fixture(scope="module")
def saved_peaky(tmp_path_factory):
    """The peaky tiny llama saved as a local hub folder (``model.path=``), as a user's download would be."""
    from rocketkv.harness.models import tiny_tokenizer

    folder = tmp_path_factory.mktemp("peaky")
    peaky_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def hub_spec(folder, dtype):
    return ModelSpec(name="peaky", source="hub", max_len=8192, path=str(folder), dtype=dtype, device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rotary_buffers_stay_float32_on_every_load_path(saved_peaky, dtype):
    from transformers import AutoModelForCausalLM

    want = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    stock = AutoModelForCausalLM.from_pretrained(saved_peaky, dtype=want)
    loaded = {
        "hub folder": load_model(hub_spec(saved_peaky, dtype))[0],
        "tiny-random": load_model(ModelSpec(name="t", source="tiny_random", max_len=8192, dtype=dtype,
                                            device="cpu"))[0],
        "random weights": load_model(ModelSpec(name="r", source="random_weights", max_len=16384,
                                               architecture=SMALL_LLAMA3, dtype=dtype, device="cpu"))[0],
    }
    assert {b.dtype for b in rotary_buffers(stock).values()} == {torch.float32}
    for path, model in loaded.items():
        assert model.dtype == want, path
        buffers = rotary_buffers(model)
        assert buffers and {b.dtype for b in buffers.values()} == {torch.float32}, (path, buffers)
    for name, buf in rotary_buffers(stock).items():  # the same frequencies, not merely the same dtype
        torch.testing.assert_close(rotary_buffers(loaded["hub folder"])[name], buf, rtol=0, atol=0)


def test_rotary_buffers_stay_float32_for_the_embedded_gguf_model():
    cfg = yaml.safe_load((REPO / "conf" / "model" / "smollm2-135m.yaml").read_text())
    if importlib.util.find_spec(cfg["gguf_parts"][0][0]) is None:
        pytest.skip(f"the embedded model's package is not installed ({cfg['install']})")
    model, _ = load_model(ModelSpec.from_cfg({**cfg, "dtype": "bfloat16", "device": "cpu"}))
    assert model.dtype == torch.bfloat16
    assert {b.dtype for b in rotary_buffers(model).values()} == {torch.float32}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_full_kv_in_gpu_dtypes_generates_what_stock_transformers_does(saved_peaky, dtype):
    """At 4k+ positions a bf16/fp16 rotary table moves the phases enough to change the tokens: this fails if the
    harness casts the rotary buffers."""
    from transformers import AutoModelForCausalLM

    want = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    ids = torch.randint(3, 1000, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    generate = dict(attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(saved_peaky, dtype=want).eval()
        expected = stock.generate(ids, **generate)[0, PROMPT_LEN:]
        model, _ = load_model(hub_spec(saved_peaky, dtype))
        with compress(model, "full", None, max_new_tokens=MAX_NEW) as session:
            tokens = model.generate(ids, **generate)[0, PROMPT_LEN:]
    assert len(set(expected.tolist())) > 1  # the model is not degenerate
    assert tokens.tolist() == expected.tolist()
    assert session.stats()["decode_steps"] == MAX_NEW
