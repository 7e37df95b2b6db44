"""One sample's prediction records: decoded alone with its own prefill (``run_sample``), or for every cell of a
grid from one shared dense prefill (``run_cells_shared_prefill``), where the cells whose plan is dense share one
decode.  Both give the same tokens, statistics and files; each decode is timed alone."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from evals.base import Sample, Task
from rocketkv.core import AttentionShape, compress
from rocketkv.harness.cells import Cell
from rocketkv.core.graphs import rope_types, use_cuda_graphs
from rocketkv.harness import progress
from rocketkv.harness.generation import Decoding, Timer, decode, forward, prefill
from rocketkv.harness.memory import PeakMemory, process_peak_rss
from rocketkv.harness.models import ModelSpec

STAT_KEYS = ("kept_tokens", "attended_tokens", "elements_read_per_step", "bytes_read_per_step", "stored_kv_bytes",
             "metadata_bytes")


@dataclass
class Memory:
    """Peak memory of one sample in one cell (see ``PeakMemory`` for what is measured on which device)."""

    peak: int | None  # the sample's peak, prefill included (the shared prefill's, in a grid)
    decode_peak: int | None  # peak of the timed decode loop, less what a shared prefill holds for other cells
    source: str | None


@dataclass
class Decoded:
    """One decode of one sample: what it produced and what it cost."""

    decoding: Decoding
    time_prefill_s: float
    stats: dict
    memory: Memory


def sample_record(sample: Sample, rows: list[list[int]], out: Decoded, plan: dict, task: Task) -> dict:
    d = out.decoding
    record = {
        "id": sample.id, "subtask": sample.subtask, "meta": sample.meta, "prompt_tokens": len(rows[0]),
        "prediction": d.texts[0], "references": sample.references, "score": None,
        "new_tokens": len(d.tokens[0]), "time_prefill_s": out.time_prefill_s, "time_decode_s": d.seconds,
        "peak_mem_bytes": out.memory.peak, "decode_peak_mem_bytes": out.memory.decode_peak,
        "peak_mem_source": out.memory.source, "stats": {k: out.stats.get(k) for k in STAT_KEYS},
        "budget_params": plan,
    }
    if len(rows) > 1 or d.setup_steps or d.step_seconds:  # a batch, a CUDA graph's replays, or timed steps
        record["decode"] = {"batch": len(rows), "steps": d.steps, "setup_steps": d.setup_steps,
                            "setup_s": d.setup_seconds}
        if d.step_seconds:
            record["decode"]["step_ms"] = [round(1e3 * s, 4) for s in d.step_seconds]
        if d.kernels_per_step is not None:
            record["decode"]["kernels_per_step"] = d.kernels_per_step
    record["score"] = task.score_record(sample, record)
    return record


def _peak(mem: PeakMemory, *phases: int | None) -> int | None:
    """The sample's peak over its phases; without a per-phase probe (CPU off Linux) the process's lifetime peak."""
    known = [p for p in phases if p is not None]
    if known:
        return max(known)
    return None if mem.device.type == "cuda" else process_peak_rss()


def held_bytes(cache) -> int:
    """Bytes of every tensor storage a cache holds (K/V, positions, masks, captured queries, metadata)."""
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values, layer.positions, layer.visible, layer.captured_q, *layer.meta.values()):
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def run_sample(model, tokenizer, spec: ModelSpec, sample: Sample, rows: list[list[int]], cell: Cell,
               task: Task) -> dict:
    """One sample of one cell with its own prefill."""
    mem = PeakMemory(model.device)
    mem.reset()
    n = len(rows[0])
    split = cell.method.decode_last_prompt_token and n >= 2
    plan = cell.plan(n, sample.max_new_tokens, AttentionShape.of(model), spec.plan_max_len)
    with compress(model, cell.method, max_new_tokens=sample.max_new_tokens, model_max_len=spec.plan_max_len) as session:
        cache = session.new_cache(sample.max_new_tokens, prompt_len=n if split else None, plan=plan)
        logits, t_prefill = prefill(model, rows, cache, split)
        prefill_peak = mem.read()
        mem.reset()
        decoding = decode(model, tokenizer, logits, cache, sample.max_new_tokens, sample.stop, task.ignore_eos,
                          use_cuda_graphs(cell.method.cuda_graphs, model.device, rope_types(model.config)),
                          spec.special_tokens)
        decode_peak = mem.read()
    memory = Memory(_peak(mem, prefill_peak, decode_peak), decode_peak, mem.source)
    return sample_record(sample, rows, Decoded(decoding, t_prefill, session.release(), memory), plan, task)


@dataclass
class SharedPrefill:
    """One sample's dense prefill of ``prompt[:-1]``, which every cell of a grid forks."""

    cache: DynamicCache
    seconds: float
    peak: int | None  # peak memory of the prefill
    held: int  # bytes the shared cache holds (a separate run of a cell would not hold them)

    @classmethod
    def run(cls, model, spec: ModelSpec, sample: Sample, rows: list[list[int]], window: int, mem: PeakMemory):
        mem.reset()
        with compress(model, "full", max_new_tokens=sample.max_new_tokens, model_max_len=spec.plan_max_len) as base:
            cache = base.new_cache(sample.max_new_tokens, prompt_len=len(rows[0]), capture_window=window)
            with Timer(model.device) as t, torch.inference_mode():
                forward(model, [r[:-1] for r in rows], cache)
            progress.prefilled(len(rows[0]) - 1)
            base.release()  # the cache is freed with this object, not at a later garbage collection
        return cls(cache, t.seconds, mem.read(), held_bytes(cache))

    def memory(self, mem: PeakMemory, *decode_peaks: int | None) -> Memory:
        """A decode's memory record: the sample's peak over the prefill and the decode's phases, and the timed
        decode loop's peak (the last phase) less the shared cache, which a separate run does not hold."""
        last = decode_peaks[-1]
        return Memory(_peak(mem, self.peak, *decode_peaks), None if last is None else max(0, last - self.held),
                      mem.source)


def run_cells_shared_prefill(model, tokenizer, spec: ModelSpec, sample: Sample, rows: list[list[int]],
                             cells: list[Cell], task: Task) -> list[dict]:
    """Several cells of one sample from one dense prefill of ``prompt[:-1]``: each cell compresses a view of it.

    Cells whose plan is dense for this sample (full KV, budgets covering the sequence) compute exactly the same
    thing, so one decode serves them all.  Each decode is timed alone, and its peak memory is measured from its
    own start; the decode peak excludes the shared prefill cache, which a separate run would not hold."""
    mem = PeakMemory(model.device)
    shared = SharedPrefill.run(model, spec, sample, rows, max(c.method.window for c in cells), mem)
    shape = AttentionShape.of(model)
    decoded: dict[object, Decoded] = {}
    records = []
    for i, cell in enumerate(cells):
        plan = cell.plan(len(rows[0]), sample.max_new_tokens, shape, spec.plan_max_len)
        key = "dense" if plan.get("dense") else i
        if key not in decoded:
            decoded[key] = decode_forked(model, tokenizer, spec, sample, rows, task, shared, mem, cell, plan)
        records.append(sample_record(sample, rows, decoded[key], plan, task))
    return records


def decode_forked(model, tokenizer, spec: ModelSpec, sample: Sample, rows: list[list[int]], task: Task,
                  shared: SharedPrefill, mem: PeakMemory, cell: Cell, plan: dict) -> Decoded:
    mem.reset()
    with compress(model, cell.method, max_new_tokens=sample.max_new_tokens, model_max_len=spec.plan_max_len) as session:
        with Timer(model.device) as t_last, torch.inference_mode():
            cache = session.fork(shared.cache, plan, sample.max_new_tokens)
            logits = forward(model, [r[-1:] for r in rows], cache)
        fork_peak = mem.read()
        mem.reset()
        decoding = decode(model, tokenizer, logits, cache, sample.max_new_tokens, sample.stop, task.ignore_eos,
                          use_cuda_graphs(cell.method.cuda_graphs, model.device, rope_types(model.config)),
                          spec.special_tokens)
        decode_peak = mem.read()
    stats = session.release()
    del cache, logits
    return Decoded(decoding, shared.seconds + t_last.seconds, stats, shared.memory(mem, fork_peak, decode_peak))
