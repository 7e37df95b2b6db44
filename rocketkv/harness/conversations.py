"""One conversation of a multi-turn task in one cell: a cache carried over the turns.

Each turn's tokens are fed after the previous answer (all but the last in one forward, then the last as the first
decode step, as for a single prompt), the answer is decoded greedily and scored, and its tokens stay in the cache
(the answer's last token, never fed by the decode loop, goes in with the next turn; an EOS does not).  Between
turns ``CompressionSession.next_turn`` prepares the cache: what a later turn's prefill does is the method's own
(full KV keeps everything; one-shot methods keep what they kept at the first prefill and decode the turn's tokens
step by step; RocketKV-MT selects again from the whole history).  One record per conversation, written when the
last turn is done, holds every turn's prediction and score: a rerun skips finished conversations and redoes a
conversation a kill cut short.  In the query-agnostic mode the context comes as a row of its own: it is prefilled
and compressed alone, and the first turn is fed on the compressed cache like the later ones.
"""
from __future__ import annotations

from evals.base import Sample, Task
from rocketkv.core import AttentionShape, compress
from rocketkv.core.graphs import rope_types, use_cuda_graphs
from rocketkv.harness.cells import Cell, plan_shape
from rocketkv.harness.generation import decode, prefill
from rocketkv.harness.memory import PeakMemory
from rocketkv.harness.models import ModelSpec
from rocketkv.harness.sample_runs import STAT_KEYS, _peak


def run_conversation(model, tokenizer, spec: ModelSpec, sample: Sample, turns: list[list[int]], cell: Cell,
                     task: Task) -> dict:
    """The record of one conversation (``turns``: each turn's token ids) in one cell."""
    mem = PeakMemory(model.device)
    mem.reset()
    new = sample.max_new_tokens
    plan = cell.plan(*plan_shape(sample, turns), AttentionShape.of(model), spec.plan_max_len)
    graphs = use_cuda_graphs(cell.method.cuda_graphs, model.device, rope_types(model.config))
    split = cell.method.decode_last_prompt_token
    done, peaks = [], []
    with compress(model, cell.method, max_new_tokens=new, model_max_len=spec.plan_max_len) as session:
        cache = session.new_cache(new, prompt_len=len(turns[0]) if split else None, plan=plan)
        unfed: list[int] = []
        context = turns[:len(turns) - len(sample.turns)]  # the query-agnostic mode: the context alone, compressed first
        context_prefill = prefill(model, context, cache, split and len(context[0]) >= 2)[1] if context else 0.0
        for i, (ids, turn) in enumerate(zip(turns[len(context):], sample.turns)):
            feed = unfed + ids
            if i or context:
                session.next_turn(cache, len(feed), new)
            logits, t_prefill = prefill(model, [feed], cache, split and len(feed) >= 2)
            t_prefill += context_prefill if i == 0 else 0.0
            decoding = decode(model, tokenizer, logits, cache, new, sample.stop, task.ignore_eos, graphs,
                              spec.special_tokens)
            tokens = decoding.tokens[0]
            # the last answer token, unless the answer ended at EOS (or the task drops it)
            unfed = tokens[decoding.steps:] if task.feed_last_answer_token else []
            text = decoding.texts[0]
            done.append({"turn": i, "prompt_tokens": len(feed), "prediction": text, "references": turn.references,
                         "score": task.score_turn(sample, i, text), "new_tokens": len(tokens),
                         "time_prefill_s": t_prefill, "time_decode_s": decoding.seconds, "meta": turn.meta})
            peaks.append(mem.read())
        stats = session.release()
    scores = [t["score"] for t in done]
    return {
        "id": sample.id, "subtask": sample.subtask, "meta": sample.meta,
        "prompt_tokens": sum(map(len, context)) + sum(t["prompt_tokens"] for t in done),
        "prediction": [t["prediction"] for t in done],
        "references": [t["references"] for t in done], "score": sum(scores) / len(scores),
        "new_tokens": sum(t["new_tokens"] for t in done), "time_prefill_s": sum(t["time_prefill_s"] for t in done),
        "time_decode_s": sum(t["time_decode_s"] for t in done), "peak_mem_bytes": _peak(mem, *peaks),
        "decode_peak_mem_bytes": None, "peak_mem_source": mem.source,
        "stats": {k: stats.get(k) for k in STAT_KEYS}, "budget_params": plan, "turns": done,
    }
