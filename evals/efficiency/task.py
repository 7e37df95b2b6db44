"""Decode efficiency (the paper's speed and memory setting): random-token prompts at given lengths, a fixed
number of new tokens, batch 1.

Each prompt is ``length`` token ids drawn uniformly from the tokenizer's vocabulary without its special and added
tokens (seeded per length and repeat), used as is: no template, no BOS, no truncation. Decoding never stops early
(``ignore_eos``, no stop strings), so every method decodes exactly ``max_new_tokens`` tokens. A sample's ``score``
is its decode speed in tokens per second, so the leaderboard, tables and plots show speed; ``metrics.json`` also
holds, per length, ms per decode step, the decode-phase peak memory, KV bytes read per step, stored KV bytes and
the method's metadata bytes (page min/max keys).

The first new token comes from the last prompt token's step, so the timed decode loop runs ``max_new_tokens - 1``
forward steps; tokens/s = steps / decode seconds and ms/step = decode seconds / steps (batch 1: one token a step).
With ``warmup`` a first sample at the smallest length (different tokens) runs every cell once before the timed
ones (CUDA context, Triton compilation, allocator growth) and is left out of every number.
"""
from __future__ import annotations

import math
import random

from evals.base import Sample, Task, check_lengths_fit, int_list, int_option, stable_hash

MIB = 2**20
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


def decode_steps(record: dict) -> int:
    """Forward steps in the timed decode loop (the first new token comes from the last prompt token's step)."""
    return max(0, int(record.get("new_tokens") or 0) - 1)


class EfficiencyTask(Task):
    name = "efficiency"
    ignore_eos = True
    score_name = "decode tok/s"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lengths = int_list("lengths", cfg.get("lengths", [1024, 2048]), 64, "[1024,2048]")
        self.repeats = int_option("repeats", cfg.get("repeats", 1), 1)
        self.seed = int_option("seed", cfg.get("seed", 0), 0)
        # one timed decode step or more: the first new token comes from the last prompt token's step
        self.max_new_tokens = int_option("max_new_tokens", cfg.get("max_new_tokens", 50), 2)
        self.warmup = bool(cfg.get("warmup", True))

    def validate(self, model_max_len: int) -> None:
        check_lengths_fit(self.lengths, self.max_new_tokens, model_max_len)

    def samples(self, tokenizer, model_max_len):
        allowed = allowed_token_ids(tokenizer)
        out = []
        if self.warmup:
            n = min(self.lengths)
            out.append(self._sample(f"{WARMUP}_len{n}", random_prompt_ids(allowed, n, self.seed, WARMUP), WARMUP,
                                    {"length": n, WARMUP: True}))
        for n in self.lengths:
            for r in range(self.repeats):
                out.append(self._sample(f"len{n}_rep{r}", random_prompt_ids(allowed, n, self.seed, r), f"len={n}",
                                        {"length": n, "repeat": r}))
        return out

    def _sample(self, sample_id, ids, subtask, meta) -> Sample:
        return Sample(id=sample_id, prompt="", prompt_ids=ids, references=[], max_new_tokens=self.max_new_tokens,
                      subtask=subtask, meta=meta)

    def score(self, sample, prediction):
        raise NotImplementedError("efficiency samples are scored from their records (score_record)")

    def score_record(self, sample, record):
        if sample.meta.get(WARMUP):
            return None  # left out of every number, the report's paired deltas included
        steps, seconds = decode_steps(record), record.get("time_decode_s") or 0.0
        return steps / seconds if steps and seconds > 0 else math.nan

    def aggregate(self, records):
        by_length: dict[int, list[dict]] = {}
        for r in records:
            if not (r.get("meta") or {}).get(WARMUP):
                by_length.setdefault(int(r["meta"]["length"]), []).append(r)
        lengths = {}
        for n, rows in sorted(by_length.items()):
            steps = sum(decode_steps(r) for r in rows)
            seconds = sum(r["time_decode_s"] for r in rows)
            mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
            stat = lambda k: mean([r["stats"][k] for r in rows if r["stats"].get(k) is not None])  # noqa: E731
            peaks = [r.get("decode_peak_mem_bytes") for r in rows if r.get("decode_peak_mem_bytes") is not None]
            lengths[str(n)] = {
                "n": len(rows),
                "new_tokens": mean([r["new_tokens"] for r in rows]),
                "decode_tokens_per_s": steps / seconds if steps and seconds > 0 else None,
                "ms_per_step": 1e3 * seconds / steps if steps else None,
                "decode_peak_mem_bytes": max(peaks) if peaks else None,
                "peak_mem_source": rows[0].get("peak_mem_source"),
                "bytes_read_per_step": stat("bytes_read_per_step"),
                "stored_kv_bytes": stat("stored_kv_bytes"),
                "metadata_bytes": stat("metadata_bytes"),
            }
        subtasks = {f"len={n}": {"score": v["decode_tokens_per_s"], "n": v["n"]} for n, v in lengths.items()}
        speeds = [v["decode_tokens_per_s"] for v in lengths.values() if v["decode_tokens_per_s"] is not None]
        return {"score": sum(speeds) / len(speeds) if speeds else math.nan, "subtasks": subtasks,
                "efficiency": lengths, "n_warmup": len(records) - sum(len(v) for v in by_length.values())}

    def protocol(self):
        return {"task": self.name, "lengths": self.lengths, "repeats": self.repeats, "seed": self.seed,
                "max_new_tokens": self.max_new_tokens, "warmup": self.warmup, "prompt": "uniform random token ids",
                "ignore_eos": True}

    def summary(self, results):
        return efficiency_table(results)


# ---------------------------------------------------------------------- the table printed at the end of a run
PEAK_LABELS = {
    "cuda_max_allocated": "peak mem = torch.cuda.max_memory_allocated over the timed decode, reset per cell "
                          "(weights + this cell's cache + activations; a shared prefill cache is subtracted)",
    "process_peak_rss": "peak mem = peak RSS of the process over the timed decode, reset per cell (CPU: includes "
                        "weights and allocator caches, so it shows little; stored KV is the accounted memory)",
}


def cells_by_length(results: list[dict]):
    """Every efficiency cell of a run at every length, in the order given, as ``(length, metrics, this cell's
    numbers at that length, the full-KV cell's numbers there, or {} when full KV is not in the run)``."""
    cells = [m for m in results if isinstance(m.get("efficiency"), dict)]
    reference = next((m for m in cells if m["run"].get("reference")), None)
    for n in sorted({int(n) for m in cells for n in m["efficiency"]}):
        ref = (reference or {}).get("efficiency", {}).get(str(n), {})
        for m in cells:
            e = m["efficiency"].get(str(n))
            if e is not None:
                yield n, m, e, ref


def cell_label(metrics: dict) -> str:
    run = metrics["run"]
    return f"{run['method']}@{run['budget'] if run['budget'] is not None else 'full'}"


def ratio(value, reference, digits=2):
    if value is None or not reference:
        return "-"
    return f"{value / reference:.{digits}f}x"


def _mib(value, digits=2):
    return "-" if value is None else f"{value / MIB:.{digits}f}"


def _num(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def efficiency_table(results: list[dict]) -> str | None:
    """One row per length x method@budget with absolute numbers and ratios to the full-KV cell of the run."""
    entries = list(cells_by_length(results))
    if not entries:
        return None
    header = ["length", "method@budget", "tok/s", "ms/step", "speedup", "peak MiB", "x full", "read/step MiB",
              "x full", "stored KV MiB", "x full", "+meta MiB"]
    rows = [[str(n), cell_label(m), _num(e["decode_tokens_per_s"], 1), _num(e["ms_per_step"], 2),
             ratio(e["decode_tokens_per_s"], ref.get("decode_tokens_per_s")),
             _mib(e["decode_peak_mem_bytes"], 1), ratio(e["decode_peak_mem_bytes"], ref.get("decode_peak_mem_bytes")),
             _mib(e["bytes_read_per_step"], 3), ratio(e["bytes_read_per_step"], ref.get("bytes_read_per_step"), 3),
             _mib(e["stored_kv_bytes"], 3), ratio(e["stored_kv_bytes"], ref.get("stored_kv_bytes"), 3),
             _mib(e.get("metadata_bytes"), 3)] for n, m, e, ref in entries]
    sources = {e.get("peak_mem_source") for _, _, e, _ in entries}
    reference = any(m["run"].get("reference") for _, m, _, _ in entries)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    _, first, first_numbers, _ = entries[0]
    lines = [
        f"efficiency: {first['run'].get('model')}, {_num(first_numbers.get('new_tokens'), 0)} new tokens, batch 1; "
        "one row per length x "
        f"method@budget; 'x full' = ratio to {'the full-KV cell' if reference else 'full KV (not in this run: -)'}",
        "tok/s and ms/step: the timed greedy decode loop (new tokens - 1 forward steps, this cell alone); "
        "speedup = tok/s / full's",
        *(PEAK_LABELS[s] for s in sorted(s for s in sources if s in PEAK_LABELS)),
        *(["peak mem: not measured on this device (-)"] if sources - set(PEAK_LABELS) else []),
        "read/step = accounted K/V + metadata bytes read per decode step (all layers); stored KV = K/V bytes kept "
        "at the end of the decode; +meta = the method's page min/max keys stored on top",
        fmt(header),
        fmt(["-" * w for w in widths]),
        *(fmt(r) for r in rows),
    ]
    return "\n".join(lines)
