"""Greedy decoding, batch size 1, with separate prefill and decode timings and stop strings."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, cache,
                    stop: list[str] | None = None) -> Generation:
    device = model.device
    stop = [s for s in (stop or []) if s]
    eos = eos_token_ids(model, tokenizer)
    ids = torch.tensor([prompt_ids], device=device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    _sync(device)
    t1 = time.perf_counter()
    new: list[int] = []
    text = ""
    while True:
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        new.append(token)
        if stop:
            text, hit = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
            if hit:
                break
        if len(new) >= max_new_tokens:
            break
        logits = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True).logits
    _sync(device)
    t2 = time.perf_counter()
    if not stop:
        text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(new, text, t1 - t0, t2 - t1)
