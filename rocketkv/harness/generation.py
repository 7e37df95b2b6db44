"""Greedy decoding of one prompt or a batch of equal-length prompts, with separate prefill and decode timings,
stop strings, and the decode steps eager or replayed as a CUDA graph (``rocketkv.core.graphs``)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rocketkv.core.graphs import DecodeStep
from rocketkv.core.session import cache_kwarg
from rocketkv.harness import progress


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    time_prefill_s: float
    time_decode_s: float


@dataclass
class Decoding:
    """What a decode produced, per row, and what it cost."""

    tokens: list[list[int]]
    texts: list[str]
    seconds: float  # the whole decode loop
    steps: int  # forward steps in it (the first new token comes from the prefill's logits)
    setup_seconds: float = 0.0  # of which: the eager warm-up and capture steps of a CUDA graph
    setup_steps: int = 0
    kernels_per_step: int | None = None  # kernels a replayed CUDA graph launches per step (None: not captured)
    step_seconds: list[float] | None = None  # each step's time, in order (the loop without per-token checks only)


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


class StepClock:
    """The end of each step of a decode loop: the host clock on CPU, CUDA events on a GPU (recorded on the stream,
    read once after the loop, so timing a step adds no sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Time between consecutive marks."""
        if not self.cuda:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]
        if self.marks:
            self.marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]


def forward(model, rows: list[list[int]], cache) -> torch.Tensor:
    """Logits ``[B, V]`` of the last position after feeding ``rows`` (equal lengths) into ``cache``."""
    ids = torch.tensor(rows, device=model.device)
    return model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.inference_mode()
def prefill(model, rows: list[list[int]], cache, split_last: bool) -> tuple[torch.Tensor, float]:
    """Prefill the prompts; with ``split_last`` the last prompt token is fed as a separate (first decode) step."""
    with Timer(model.device) as t:
        if split_last and len(rows[0]) >= 2:
            forward(model, [r[:-1] for r in rows], cache)
            logits = forward(model, [r[-1:] for r in rows], cache)
        else:
            logits = forward(model, rows, cache)
    progress.prefilled(len(rows[0]))
    return logits, t.seconds


@torch.inference_mode()
def decode(model, tokenizer, logits: torch.Tensor, cache, max_new_tokens: int, stop: list[str] | None = None,
           ignore_eos: bool = False, cuda_graphs: bool = False, special_tokens: str = "skip") -> Decoding:
    """Greedy tokens from ``logits`` (``[B, V]``) on, per row until EOS (unless ``ignore_eos``), a stop string (cut
    from the text) or ``max_new_tokens``; the batch stops when every row has.  The first token comes from
    ``logits``; the timed loop runs one forward per later token.  With nothing to check per token (``ignore_eos``,
    no stop strings) the loop reads nothing back to the host until it ends.  ``special_tokens="keep"`` keeps
    special tokens (other than the EOS that ended a row, which is not in it) in the text, as the official runs'
    ``tokenizer.decode`` does; stop strings are looked for in the text without them either way."""
    eos = set() if ignore_eos else eos_token_ids(model, tokenizer)
    stop = [s for s in stop or [] if s]
    step = DecodeStep(model, cache, cache_kwarg(model), graphs=cuda_graphs)
    batch = logits.shape[0]
    clock = None
    with Timer(model.device) as t:
        if not eos and not stop:
            out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=logits.device)
            out[:, 0] = logits.argmax(-1)
            clock = StepClock(model.device)
            clock.mark()
            for i in range(1, max_new_tokens):
                out[:, i] = step(out[:, i - 1])
                clock.mark()
                progress.decoded(i + 1, max_new_tokens)
            tokens = out.tolist()
        else:
            tokens = _decode_checked(step, logits.argmax(-1), tokenizer, max_new_tokens, stop, eos)
    texts = [tokenizer.decode(row, skip_special_tokens=special_tokens != "keep") for row in tokens]
    if stop:
        texts = [cut_at_stop(text, stop)[0] for text in texts]
    return Decoding(tokens, texts, t.seconds, step.steps, step.setup_seconds, step.setup_steps, step.kernels_per_step,
                    None if clock is None else clock.seconds())


def _decode_checked(step: DecodeStep, first: torch.Tensor, tokenizer, max_new_tokens: int, stop: list[str],
                    eos: set[int]) -> list[list[int]]:
    """The decode loop that reads each step's tokens to stop rows at EOS or a stop string."""
    rows = [[] for _ in range(first.shape[0])]
    done = [False] * len(rows)
    chosen = first
    while True:
        for row, token in zip(range(len(rows)), chosen.tolist()):
            if done[row]:
                continue
            if token in eos:
                done[row] = True
                continue
            rows[row].append(token)
            hit = bool(stop) and cut_at_stop(tokenizer.decode(rows[row], skip_special_tokens=True), stop)[1]
            done[row] = hit or len(rows[row]) >= max_new_tokens
        if all(done):
            return rows
        progress.decoded(max(len(r) for r in rows), max_new_tokens)
        chosen = step(chosen)


def greedy_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, cache,
                    stop: list[str] | None = None, split_last: bool = False) -> Generation:
    logits, t_prefill = prefill(model, [prompt_ids], cache, split_last)
    out = decode(model, tokenizer, logits, cache, max_new_tokens, stop)
    return Generation(out.tokens[0], out.texts[0], t_prefill, out.seconds)
