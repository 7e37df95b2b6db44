"""Greedy decoding, batch size 1, with separate prefill and decode timings, stop strings and per-phase peak
memory."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from rocketkv.session import cache_kwarg


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


class PeakMemory:
    """Peak memory of one phase (``reset`` ... ``read``).

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU on Linux: the process's peak resident set
    (``VmHWM``, reset through ``/proc/self/clear_refs``), which also counts the weights, the Python heap and memory
    the allocator keeps after a free. Elsewhere ``read`` returns None (``source`` says which one applies).
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.source = "cuda_max_allocated"
        elif _reset_rss_peak():
            self.source = "process_peak_rss"
        else:
            self.source = None

    def reset(self) -> None:
        if self.source == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "process_peak_rss":
            _reset_rss_peak()

    def read(self) -> int | None:
        if self.source == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == "process_peak_rss":
            return _rss_peak()
        return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return _rss_peak() is not None
    except OSError:
        return False


def _rss_peak() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_peak_rss() -> int:
    """Peak resident set of the process over its whole life."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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


class GreedyStream:
    """One sequence's greedy output: takes chosen tokens until EOS (unless ``ignore_eos``), a stop string (cut from
    the text) or ``max_new_tokens``."""

    def __init__(self, tokenizer, max_new_tokens: int, stop: list[str] | None, eos: set[int]):
        self.tokenizer, self.max_new_tokens, self.eos = tokenizer, max_new_tokens, eos
        self.stop = [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        self._text = ""

    def push(self, token: int) -> bool:
        """Take the next chosen token; True when the sequence is finished."""
        if token in self.eos:
            return True
        self.tokens.append(token)
        if self.stop:
            self._text, hit = cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop)
            if hit:
                return True
        return len(self.tokens) >= self.max_new_tokens

    @property
    def text(self) -> str:
        return self._text if self.stop else self.tokenizer.decode(self.tokens, skip_special_tokens=True)


@torch.inference_mode()
def decode(model, tokenizer, logits: torch.Tensor, cache, max_new_tokens: int,
           stop: list[str] | None = None, ignore_eos: bool = False) -> tuple[list[int], str, float]:
    """Greedy tokens from ``logits`` on (see ``GreedyStream`` for when it stops).  The first token comes from
    ``logits``; the timed loop runs one forward per later token."""
    stream = GreedyStream(tokenizer, max_new_tokens, stop, set() if ignore_eos else eos_token_ids(model, tokenizer))
    with Timer(model.device) as t:
        while True:
            token = int(logits.argmax())
            if stream.push(token):
                break
            logits = forward(model, [token], cache)
    return stream.tokens, stream.text, t.seconds


def greedy_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, cache,
                    stop: list[str] | None = None, split_last: bool = False) -> Generation:
    logits, t_prefill = prefill(model, prompt_ids, cache, split_last)
    tokens, text, t_decode = decode(model, tokenizer, logits, cache, max_new_tokens, stop)
    return Generation(tokens, text, t_prefill, t_decode)
