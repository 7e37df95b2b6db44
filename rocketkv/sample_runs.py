"""One sample's predictions: decoded alone with its own prefill (``run_sample``), or for every cell of a grid
from one shared prefill (``run_cells_shared_prefill``): dense cells share one decode, and with
``grid.batch_decode`` the distinct cells decode as the rows of one batch, with ``grid.speculative`` as rows that
verify drafts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from transformers.cache_utils import DynamicCache

from evals.base import Sample, Task
from rocketkv.draft_verify import verify_rows
from rocketkv.generation import PeakMemory, Timer, decode, forward, prefill, process_peak_rss
from rocketkv.models import ModelSpec
from rocketkv.row_decode import decode_rows
from rocketkv.session import CompressionSession, compress

if TYPE_CHECKING:
    from rocketkv.runner import Cell

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

    tokens: list[int]
    text: str
    time_prefill_s: float
    time_decode_s: float  # a batch row's share of the batch's decode time
    stats: dict
    memory: Memory
    decoded_as: str = "alone"  # or one row of a batch of cells: "batch_row" (``grid.batch_decode``),
    # "verified_row" (``grid.speculative``)


def sample_record(sample: Sample, ids: list[int], out: Decoded, plan: dict | None, task: Task) -> dict:
    record = {
        "id": sample.id, "subtask": sample.subtask, "meta": sample.meta, "prompt_tokens": len(ids),
        "prediction": out.text, "references": sample.references, "score": None,
        "new_tokens": len(out.tokens), "time_prefill_s": out.time_prefill_s, "time_decode_s": out.time_decode_s,
        "decoded_as": out.decoded_as,
        "peak_mem_bytes": out.memory.peak, "decode_peak_mem_bytes": out.memory.decode_peak,
        "peak_mem_source": out.memory.source, "stats": {k: out.stats.get(k) for k in STAT_KEYS},
        "budget_params": plan or {},
    }
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
        tensors = [layer.keys, layer.values, layer.positions, layer.visible, layer.captured_q,
                   *getattr(layer, "meta", {}).values()]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def run_sample(model, tokenizer, spec: ModelSpec, sample: Sample, ids: list[int], cell: Cell, task: Task) -> dict:
    """One sample of one cell with its own prefill."""
    mem = PeakMemory(model.device)
    mem.reset()
    split = cell.method.decode_last_prompt_token
    with compress(model, method=cell.name, budget=cell.budget, max_new_tokens=sample.max_new_tokens,
                  model_max_len=spec.max_len, **cell.options) as session:
        cache = session.new_cache(sample.max_new_tokens, prompt_len=len(ids) if split else None)
        logits, t_prefill = prefill(model, ids, cache, split)
        prefill_peak = mem.read()
        mem.reset()
        tokens, text, t_decode = decode(model, tokenizer, logits, cache, sample.max_new_tokens, sample.stop,
                                        task.ignore_eos)
        decode_peak = mem.read()
    memory = Memory(_peak(mem, prefill_peak, decode_peak), decode_peak, mem.source)
    return sample_record(sample, ids, Decoded(tokens, text, t_prefill, t_decode, session.release(), memory),
                         session.plan, task)


@dataclass
class RowBatching:
    """``grid.batch_decode``: decode the cells as the rows of a batch, at most ``max_rows`` per batch (None: all);
    ``tie_margin`` as in ``row_decode``."""

    enabled: bool = False
    tie_margin: float = 0.01
    max_rows: int | None = None
    speculative: bool = False  # rows verify drafts (``draft_verify``) instead of decoding a token per forward

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "RowBatching":
        grid = cfg.get("grid") or {}
        margin = grid.get("tie_margin", cls.tie_margin)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError(f"grid.tie_margin={margin!r} is not valid; give a logit gap >= 0 "
                             f"(default {cls.tie_margin})")
        rows = grid.get("max_batch_rows")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"grid.max_batch_rows={rows!r} is not valid; give a number of cells >= 1, or null for all")
        flags = {}
        for key in ("batch_decode", "speculative"):
            flags[key] = grid.get(key, False)
            if not isinstance(flags[key], bool):
                raise ValueError(f"grid.{key}={flags[key]!r} is not valid; give true or false")
        return cls(flags["batch_decode"] or flags["speculative"], float(margin), rows, flags["speculative"])

    def batches(self, cells: dict) -> list[dict]:
        """``cells`` (decode key -> cell) in batches of at most ``max_rows``."""
        items = list(cells.items())
        size = self.max_rows or len(items) or 1
        return [dict(items[start:start + size]) for start in range(0, len(items), size)]


@dataclass
class SharedPrefill:
    """One sample's dense prefill of ``prompt[:-1]``, which every cell of a grid forks."""

    cache: DynamicCache
    seconds: float
    peak: int | None  # peak memory of the prefill
    held: int  # bytes the shared cache holds (a separate run of a cell would not hold them)

    @classmethod
    def run(cls, model, spec: ModelSpec, sample: Sample, ids: list[int], window: int, mem: PeakMemory):
        mem.reset()
        with compress(model, method="full", budget=None, max_new_tokens=sample.max_new_tokens,
                      model_max_len=spec.max_len) as base:
            cache = base.new_cache(sample.max_new_tokens, prompt_len=len(ids), capture_window=window)
            with Timer(model.device) as t, torch.inference_mode():
                forward(model, ids[:-1], cache)
            base.release()  # the cache is freed with this object, not at a later garbage collection
        return cls(cache, t.seconds, mem.read(), held_bytes(cache))

    def memory(self, mem: PeakMemory, *decode_peaks: int | None, read_in_place: int = 0) -> Memory:
        """A decode's memory record: the sample's peak over the prefill and the decode's phases, and the timed
        decode loop's peak (the last phase) less the shared cache, plus the shared slots the decode read in place
        (``read_in_place``): a separate run holds those itself."""
        last = decode_peaks[-1]
        decode_peak = None if last is None else max(0, last - self.held) + read_in_place
        return Memory(_peak(mem, self.peak, *decode_peaks), decode_peak, mem.source)


def read_in_place(cache) -> int:
    """Bytes of shared-prefill slots a forked cache reads without holding a copy (``CompressedLayer.share``)."""
    return sum(layer.shared_bytes() for layer in cache.layers)


def decode_keys(spec: ModelSpec, sample: Sample, ids: list[int], shared: SharedPrefill, cells: list[Cell]
                ) -> tuple[list[dict], list, dict]:
    """Each cell's plan for this sample and its decode key ("dense" for every cell whose plan is dense: they all
    compute what full KV computes, so one decode serves them), and each distinct key's first cell."""
    first = shared.cache.layers[0]
    plans = [c.method.plan(len(ids), sample.max_new_tokens, first.keys.shape[-1], spec.max_len,
                           group_size=first.state.group_size) for c in cells]
    keys = ["dense" if plan.get("dense") else i for i, plan in enumerate(plans)]
    distinct: dict = {}
    for key, cell in zip(keys, cells):
        distinct.setdefault(key, cell)
    return plans, keys, distinct


def run_cells_shared_prefill(model, tokenizer, spec: ModelSpec, sample: Sample, ids: list[int], cells: list[Cell],
                             task: Task, batching: RowBatching = RowBatching()) -> list[dict]:
    """Several cells of one sample from one dense prefill of ``prompt[:-1]``: each cell compresses a view of it.

    Cells whose plan is dense for this sample (full KV, budgets covering the sequence) compute exactly the same
    thing, so one decode serves them all.  Each decode is timed alone, and its peak memory is measured from its
    own start; the decode peak excludes the shared prefill cache, which a separate run would not hold.  With
    ``batching.enabled`` the distinct cells decode as rows of a batch (``row_decode``); with ``batching.speculative``
    the dense decode runs first, alone, verifying its own prompt lookups, and the other cells verify drafts as rows
    (``draft_verify``).  A row dropped at a near tie is decoded alone, exactly."""
    mem = PeakMemory(model.device)
    shared = SharedPrefill.run(model, spec, sample, ids, max(c.method.window for c in cells), mem)
    plans, keys, distinct = decode_keys(spec, sample, ids, shared, cells)
    decoded: dict[object, Decoded] = {}
    if batching.speculative and len(distinct) > 1:
        if "dense" in distinct:  # first, alone, drafting itself by prompt lookup; its tokens draft every other cell
            decoded.update(_verify_rows(model, tokenizer, spec, sample, ids, task, shared, mem,
                                        {"dense": distinct["dense"]}, [], batching.tie_margin))
            if "dense" not in decoded:  # a near tie: the exact per-cell path
                decoded["dense"] = decode_forked(model, tokenizer, spec, sample, ids, task, shared, mem,
                                                  distinct["dense"])
        for batch in batching.batches({key: cell for key, cell in distinct.items() if key != "dense"}):
            known = [d.tokens for d in decoded.values()]  # every finished decode drafts the next batch
            decoded.update(_verify_rows(model, tokenizer, spec, sample, ids, task, shared, mem, batch, known,
                                        batching.tie_margin))
    elif batching.enabled and len(distinct) > 1:
        for batch in batching.batches(distinct):
            if len(batch) > 1:
                decoded.update(_decode_rows(model, tokenizer, spec, sample, ids, task, shared, mem, batch,
                                            batching.tie_margin))
    records = []
    for cell, plan, key in zip(cells, plans, keys):
        if key not in decoded:
            decoded[key] = decode_forked(model, tokenizer, spec, sample, ids, task, shared, mem, cell)
        records.append(sample_record(sample, ids, decoded[key], plan, task))
    return records


def _as_rows(model, spec, sample, shared: SharedPrefill, mem, distinct: dict, decode_rows_of):
    """Fork every cell of ``distinct`` from the shared prefill and run ``decode_rows_of(caches)`` on them as the rows
    of one batch.  Returns its result, each cell's statistics and the memory record; the forks are freed."""
    mem.reset()
    sessions = {key: CompressionSession(model, cell.method, sample.max_new_tokens, spec.max_len)
                for key, cell in distinct.items()}
    with compress(model, method="full", budget=None, max_new_tokens=sample.max_new_tokens,
                  model_max_len=spec.max_len):
        caches = [session.fork(shared.cache, sample.max_new_tokens) for session in sessions.values()]
        result = decode_rows_of(caches)
    in_place = sum(read_in_place(cache) for cache in caches)
    stats = {key: session.release() for key, session in sessions.items()}
    del caches
    return result, stats, shared.memory(mem, mem.read(), read_in_place=in_place)


def _decode_rows(model, tokenizer, spec, sample, ids, task, shared: SharedPrefill, mem, distinct: dict,
                 tie_margin: float) -> dict:
    (streams, t_first, t_decode), stats, memory = _as_rows(
        model, spec, sample, shared, mem, distinct,
        lambda caches: decode_rows(model, tokenizer, caches, ids[-1], sample.max_new_tokens, sample.stop,
                                   task.ignore_eos, tie_margin))
    n = len(distinct)  # each row records its share of the batch's time
    return {key: Decoded(stream.tokens, stream.text, shared.seconds + t_first / n, t_decode / n, stats[key],
                         memory, "batch_row")
            for key, stream in zip(distinct, streams) if stream is not None}


def _verify_rows(model, tokenizer, spec, sample, ids, task, shared: SharedPrefill, mem, distinct: dict,
                 known: list[list[int]], tie_margin: float) -> dict:
    (streams, seconds), stats, memory = _as_rows(
        model, spec, sample, shared, mem, distinct,
        lambda caches: verify_rows(model, tokenizer, caches, ids, known, sample.max_new_tokens, sample.stop,
                                   task.ignore_eos, tie_margin))
    return {key: Decoded(stream.tokens, stream.text, shared.seconds, row_seconds, stats[key], memory, "verified_row")
            for key, stream, row_seconds in zip(distinct, streams, seconds) if stream is not None}


def decode_forked(model, tokenizer, spec, sample, ids, task, shared: SharedPrefill, mem, cell: Cell) -> Decoded:
    mem.reset()
    with compress(model, method=cell.name, budget=cell.budget, max_new_tokens=sample.max_new_tokens,
                  model_max_len=spec.max_len, **cell.options) as session:
        with Timer(model.device) as t_last, torch.inference_mode():
            cache = session.fork(shared.cache, sample.max_new_tokens)
            logits = forward(model, ids[-1:], cache)
        fork_peak = mem.read()
        mem.reset()
        tokens, text, t_decode = decode(model, tokenizer, logits, cache, sample.max_new_tokens, sample.stop,
                                        task.ignore_eos)
        decode_peak = mem.read()
        in_place = read_in_place(cache)
    stats = session.release()
    del cache, logits
    return Decoded(tokens, text, shared.seconds + t_last.seconds, t_decode, stats,
                   shared.memory(mem, fork_peak, decode_peak, read_in_place=in_place))
