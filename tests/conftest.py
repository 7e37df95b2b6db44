import functools
import os
from pathlib import Path

import pytest
import torch

from rocketkv.harness.models import build_tiny_random

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# How long a test waits for a subprocess (a run, a sweep): a loaded machine must make the suite slower, never red,
# so this is no tighter than pytest-timeout's per-test limit when one is set (--timeout or the ini), else 30 minutes,
# which only a hung process reaches.  Set in pytest_configure, before the test modules import it.
SUBPROCESS_TIMEOUT = 1800.0


def pytest_configure(config):
    global SUBPROCESS_TIMEOUT
    per_test = None
    try:
        per_test = config.getoption("timeout", None) or config.getini("timeout")
    except ValueError:  # pytest-timeout is not installed
        pass
    if per_test and float(per_test) > 0:
        SUBPROCESS_TIMEOUT = float(per_test)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def compose_cfg():
    """Compose the runner's Hydra config with overrides, as ``python run_eval.py <overrides>`` would."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose


@functools.lru_cache(maxsize=None)
def peaky_model(arch="llama"):
    """A tiny random model with sharpened attention and logits, so greedy decoding varies and methods can differ."""
    model, _ = build_tiny_random(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(8)
            elif any(s in name for s in ("embed_tokens", "lm_head", "v_proj", "o_proj")):
                p.mul_(5)
    return model


def greedy_steps(model, cache, logits, max_new, feed_last=True):
    """Greedy decoding from the logits of the last token fed: (tokens [B, max_new], logits of every step).

    ``feed_last=False`` does not feed the last chosen token back, so the cache ends where a real decode ends."""
    tokens, all_logits = [], []
    with torch.no_grad():
        for i in range(max_new):
            all_logits.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            if feed_last or i + 1 < max_new:
                logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.cat(tokens, dim=1), torch.stack(all_logits, dim=1)


def prompt_logits(model, cache, ids):
    """Logits after the prompt, fed whole into ``cache``."""
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]


def stored(layer, name):
    """A cache layer's ``keys``/``values``/``positions``/``visible`` cut to its stored slots (buffers hold more)."""
    t = getattr(layer, name)
    if t is None:
        return None
    return t[:, :, :layer.stored] if name in ("keys", "values") else t[..., :layer.stored]
