"""One sample in the query-agnostic mode (``task.query_aware=false``): the context part of its prompt is prefilled
and compressed before the question is seen; the question (and what follows it: the template's end, the answer
prefix) is then fed on the compressed cache as a later turn (``CompressionSession.next_turn``), and the answer is
decoded.  The prompt's tokens are the query-aware mode's, split where the question starts
(``evals.prompting.context_length``), so full KV gives the same answers in both modes.

Several cells of one sample compress forks of one shared dense prefill of the context, as in the query-aware grid;
the plans are the query-aware ones (the whole prompt), so both modes run the same budgets.
"""
from __future__ import annotations

import torch

from evals.base import Sample, Task
from evals.prompting import context_length
from rocketkv.core import AttentionShape, compress
from rocketkv.core.graphs import use_cuda_graphs
from rocketkv.harness.cells import Cell
from rocketkv.harness.generation import Timer, decode, forward, prefill
from rocketkv.harness.memory import PeakMemory
from rocketkv.harness.models import ModelSpec
from rocketkv.harness.sample_runs import Decoded, Memory, SharedPrefill, _peak, sample_record


def _ask(model, tokenizer, session, cache, question: list[int], sample: Sample, task: Task, cell: Cell):
    """Feed the question on the compressed cache as the next turn and decode the answer: (decoding, feed seconds)."""
    session.next_turn(cache, len(question), sample.max_new_tokens)
    logits, seconds = prefill(model, [question], cache, split_last=True)
    decoding = decode(model, tokenizer, logits, cache, sample.max_new_tokens, sample.stop, task.ignore_eos,
                      use_cuda_graphs(cell.method.cuda_graphs, model.device))
    return decoding, seconds


def run_cells_query_agnostic(model, tokenizer, spec: ModelSpec, sample: Sample, rows: list[list[int]],
                             cells: list[Cell], task: Task) -> list[dict]:
    """The records of ``cells`` for one sample (one row) in the query-agnostic mode."""
    ids = rows[0]
    split = context_length(tokenizer, ids, sample)
    context, question = ids[:split], ids[split:]
    mem = PeakMemory(model.device)
    shape = AttentionShape.of(model)
    shared = None
    if len(cells) > 1 and all(c.method.decode_last_prompt_token for c in cells) and split >= 2:
        shared = SharedPrefill.run(model, spec, sample, [context], max(c.method.window for c in cells), mem)
    decoded: dict[object, Decoded] = {}
    records = []
    for i, cell in enumerate(cells):
        plan = cell.plan(len(ids), sample.max_new_tokens, shape, spec.plan_max_len)
        key = "dense" if plan.get("dense") else i
        if key not in decoded:
            mem.reset()
            with compress(model, cell.method, max_new_tokens=sample.max_new_tokens,
                          model_max_len=spec.plan_max_len) as session:
                if shared is not None:
                    with Timer(model.device) as t, torch.inference_mode():
                        cache = session.fork(shared.cache, plan, sample.max_new_tokens)
                        forward(model, [context[-1:]], cache)
                    seconds = shared.seconds + t.seconds
                else:
                    last = cell.method.decode_last_prompt_token and split >= 2
                    cache = session.new_cache(sample.max_new_tokens, prompt_len=split if last else None, plan=plan)
                    seconds = prefill(model, [context], cache, last)[1]
                context_peak = mem.read()
                mem.reset()
                decoding, asked = _ask(model, tokenizer, session, cache, question, sample, task, cell)
                decode_peak = mem.read()
            stats = session.release()
            memory = shared.memory(mem, context_peak, decode_peak) if shared is not None else \
                Memory(_peak(mem, context_peak, decode_peak), decode_peak, mem.source)
            decoded[key] = Decoded(decoding, seconds + asked, stats, memory)
            del cache
        record = sample_record(sample, rows, decoded[key], plan, task)
        record["context_tokens"] = split
        records.append(record)
    return records
