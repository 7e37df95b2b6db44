"""Greedy decoding, batch size 1, with separate prefill and decode timings and stop strings."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rocketkv.core.session import cache_kwarg


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    time_prefill_s: float
    time_decode_s: float


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def forward(model, token_ids: list[int], cache) -> torch.Tensor:
    """Logits of the last position after feeding ``token_ids`` into ``cache``."""
    ids = torch.tensor([token_ids], device=model.device)
    return model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1).logits[0, -1]


@torch.inference_mode()
def prefill(model, prompt_ids: list[int], cache, split_last: bool) -> tuple[torch.Tensor, float]:
    """Prefill the prompt; with ``split_last`` the last prompt token is fed as a separate (first decode) step."""
    with Timer(model.device) as t:
        if split_last and len(prompt_ids) >= 2:
            forward(model, prompt_ids[:-1], cache)
            logits = forward(model, prompt_ids[-1:], cache)
        else:
            logits = forward(model, prompt_ids, cache)
    return logits, t.seconds


@torch.inference_mode()
def decode(model, tokenizer, logits: torch.Tensor, cache, max_new_tokens: int,
           stop: list[str] | None = None, ignore_eos: bool = False) -> tuple[list[int], str, float]:
    """Greedy tokens from ``logits`` on, until EOS (unless ``ignore_eos``), a stop string (cut from the text) or
    ``max_new_tokens``.  The first token comes from ``logits``; the timed loop runs one forward per later token."""
    eos = set() if ignore_eos else eos_token_ids(model, tokenizer)
    stop = [s for s in stop or [] if s]
    tokens: list[int] = []
    text = ""
    with Timer(model.device) as t:
        while len(tokens) < max_new_tokens:
            token = int(logits.argmax())
            if token in eos:
                break
            tokens.append(token)
            if stop:
                text, hit = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
                if hit:
                    break
            if len(tokens) < max_new_tokens:
                logits = forward(model, [token], cache)
    return tokens, text if stop else tokenizer.decode(tokens, skip_special_tokens=True), t.seconds


def greedy_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, cache,
                    stop: list[str] | None = None, split_last: bool = False) -> Generation:
    logits, t_prefill = prefill(model, prompt_ids, cache, split_last)
    tokens, text, t_decode = decode(model, tokenizer, logits, cache, max_new_tokens, stop)
    return Generation(tokens, text, t_prefill, t_decode)
