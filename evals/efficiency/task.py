"""Decode efficiency (the paper's speed and memory setting): random-token prompts at given lengths, a fixed
number of new tokens, ``batch_size`` prompts decoded together (the paper: 1).

Each prompt is ``length`` token ids drawn uniformly from the tokenizer's vocabulary without its special and added
tokens (seeded per length, repeat and row), used as is: no template, no BOS, no truncation. Decoding never stops
early (``ignore_eos``, no stop strings), so every method decodes exactly ``max_new_tokens`` tokens per row. A
sample's ``score`` is its decode speed in tokens per second, so the leaderboard, tables and plots show speed;
``metrics.json`` also holds, per length, ms per decode step, the decode-phase peak memory, KV bytes read per step,
stored KV bytes, the method's metadata bytes (page min/max keys) and, when the steps replay a CUDA graph, the
kernels the graph launches per step; under ``context`` the model's weight bytes and the device's copy bandwidth
measured in the run (the floor of the table).

The first new token comes from the last prompt token's step, so the decode loop runs ``max_new_tokens - 1``
forward steps, each timed (``decode.step_ms`` in the record: the host clock on CPU, CUDA events on a GPU). ms/step
is the median steady step (over every repeat of the length): when the steps replay a CUDA graph, the eager warm-up
and capture steps are left out (they are recorded apart); the median keeps a burst of another process on a shared
machine out of the number (``ms_per_step_mean`` in ``metrics.json`` is the plain mean); tokens/s = batch x 1000 /
ms/step.  With ``warmup`` a first sample at the
smallest length (different tokens) runs every cell once before the timed ones (CUDA context, Triton compilation,
allocator growth) and is left out of every number.
"""
from __future__ import annotations

import math
import random
import statistics

from evals.base import Sample, Task, check_lengths_fit, int_list, int_option, stable_hash
from evals.efficiency.floor import copy_bandwidth, weight_bytes
from evals.efficiency.table import efficiency_table

WARMUP = "warmup"


def random_prompt_ids(allowed: list[int], length: int, seed: int, repeat: int | str) -> list[int]:
    rng = random.Random(stable_hash(["efficiency", seed, length, repeat], n=16))
    return rng.choices(allowed, k=length)


def allowed_token_ids(tokenizer) -> list[int]:
    """Every id of the tokenizer except special and added tokens."""
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    allowed = [i for i in range(len(tokenizer)) if i not in excluded]
    if not allowed:
        raise ValueError("the tokenizer has no regular tokens to draw random prompts from")
    return allowed


def steady_decode(record: dict) -> tuple[int, float, int]:
    """(steps, seconds, rows) of a record's steady decode steps: the loop's forward steps (the first new token comes
    from the last prompt token's step) less a CUDA graph's warm-up and capture steps."""
    decode = record.get("decode") or {}
    steps = decode.get("steps", max(0, int(record.get("new_tokens") or 0) - 1)) - decode.get("setup_steps", 0)
    seconds = (record.get("time_decode_s") or 0.0) - decode.get("setup_s", 0.0)
    return steps, seconds, decode.get("batch", 1)


def steady_step_ms(record: dict) -> list[float]:
    """The record's timed steady steps in ms (empty when its steps were not timed one by one)."""
    decode = record.get("decode") or {}
    return (decode.get("step_ms") or [])[decode.get("setup_steps", 0):]


class EfficiencyTask(Task):
    name = "efficiency"
    ignore_eos = True
    measures_accuracy = False
    score_name = "decode tok/s"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lengths = int_list("lengths", cfg.get("lengths", [1024, 2048]), 64, "[1024,2048]")
        self.repeats = int_option("repeats", cfg.get("repeats", 1), 1)
        self.seed = int_option("seed", cfg.get("seed", 0), 0)
        # one timed decode step or more: the first new token comes from the last prompt token's step
        self.max_new_tokens = int_option("max_new_tokens", cfg.get("max_new_tokens", 50), 2)
        self.warmup = bool(cfg.get("warmup", True))
        self.batch_size = int_option("batch_size", cfg.get("batch_size", 1), 1)

    def validate(self, model_max_len: int) -> None:
        check_lengths_fit(self.lengths, self.max_new_tokens, model_max_len)

    def samples(self, tokenizer, model_max_len):
        allowed = allowed_token_ids(tokenizer)
        out = []
        if self.warmup:
            n = min(self.lengths)
            out.append(self._sample(f"{WARMUP}_len{n}", self._rows(allowed, n, WARMUP), WARMUP,
                                    {"length": n, WARMUP: True}))
        for n in self.lengths:
            for r in range(self.repeats):
                out.append(self._sample(f"len{n}_rep{r}", self._rows(allowed, n, r), f"len={n}",
                                        {"length": n, "repeat": r}))
        return out

    def _rows(self, allowed, length, repeat):
        """One prompt (batch 1), or ``batch_size`` different ones of the same length."""
        if self.batch_size == 1:
            return random_prompt_ids(allowed, length, self.seed, repeat)
        return [random_prompt_ids(allowed, length, self.seed, f"{repeat}/{row}") for row in range(self.batch_size)]

    def _sample(self, sample_id, ids, subtask, meta) -> Sample:
        return Sample(id=sample_id, prompt="", prompt_ids=ids, references=[], max_new_tokens=self.max_new_tokens,
                      subtask=subtask, meta={**meta, "batch": self.batch_size})

    def context(self, model) -> dict:
        return {"weight_bytes": weight_bytes(model), "copy_bytes_per_s": copy_bandwidth(model.device),
                "device": str(model.device)}

    def score(self, sample, prediction):
        raise NotImplementedError("efficiency samples are scored from their records (score_record)")

    def score_record(self, sample, record):
        if sample.meta.get(WARMUP):
            return None  # left out of every number, the report's paired deltas included
        steps, seconds, rows = steady_decode(record)
        step_ms = steady_step_ms(record)
        if step_ms:
            return rows * 1e3 / statistics.median(step_ms)
        return rows * steps / seconds if steps and seconds > 0 else math.nan

    def aggregate(self, records):
        by_length: dict[int, list[dict]] = {}
        for r in records:
            if not (r.get("meta") or {}).get(WARMUP):
                by_length.setdefault(int(r["meta"]["length"]), []).append(r)
        lengths = {}
        for n, rows in sorted(by_length.items()):
            steady = [steady_decode(r) for r in rows]
            steps, seconds = sum(s[0] for s in steady), sum(s[1] for s in steady)
            batch = steady[0][2]
            step_ms = [ms for r in rows for ms in steady_step_ms(r)]
            mean_ms = 1e3 * seconds / steps if steps and seconds > 0 else None
            ms_per_step = statistics.median(step_ms) if step_ms else mean_ms
            mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
            stat = lambda k: mean([r["stats"][k] for r in rows if r["stats"].get(k) is not None])  # noqa: E731
            peaks = [r.get("decode_peak_mem_bytes") for r in rows if r.get("decode_peak_mem_bytes") is not None]
            launches = [r["decode"]["kernels_per_step"] for r in rows if "kernels_per_step" in (r.get("decode") or {})]
            lengths[str(n)] = {
                "n": len(rows),
                "new_tokens": mean([r["new_tokens"] for r in rows]),
                "batch": batch,
                "decode_tokens_per_s": batch * 1e3 / ms_per_step if ms_per_step else None,
                "ms_per_step": ms_per_step,
                "ms_per_step_mean": mean_ms,
                "decode_peak_mem_bytes": max(peaks) if peaks else None,
                "peak_mem_source": rows[0].get("peak_mem_source"),
                "bytes_read_per_step": stat("bytes_read_per_step"),
                "stored_kv_bytes": stat("stored_kv_bytes"),
                "metadata_bytes": stat("metadata_bytes"),
                "kernels_per_step": max(launches) if launches else None,
            }
        subtasks = {f"len={n}": {"score": v["decode_tokens_per_s"], "n": v["n"]} for n, v in lengths.items()}
        speeds = [v["decode_tokens_per_s"] for v in lengths.values() if v["decode_tokens_per_s"] is not None]
        return {"score": sum(speeds) / len(speeds) if speeds else math.nan, "subtasks": subtasks,
                "efficiency": lengths, "n_warmup": len(records) - sum(len(v) for v in by_length.values())}

    def protocol(self):
        return {"task": self.name, "lengths": self.lengths, "repeats": self.repeats, "seed": self.seed,
                "max_new_tokens": self.max_new_tokens, "warmup": self.warmup, "prompt": "uniform random token ids",
                "ignore_eos": True, "batch_size": self.batch_size}

    def summary(self, results):
        return efficiency_table(results)
