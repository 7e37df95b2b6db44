"""One evaluation run: a model, a task and one or more (method, budget) cells -> predictions, metrics and env on
disk, resumable sample by sample."""
from __future__ import annotations

import logging
from contextlib import ExitStack

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from evals.base import Sample, Task, stable_hash
from evals.prompting import conversation_token_ids, prompt_rows
from rocketkv.core import AttentionShape
from rocketkv.harness.cells import (Cell, check_plans, finished_metrics, grid_configs, lock_cell, make_cell,
                                    metrics_name, restore_cell_config, run_protocol, write_cell_config)
from rocketkv.harness import progress
from rocketkv.harness.conversations import run_conversation
from rocketkv.harness.models import ModelSpec, check_memory, load_model
from rocketkv.harness.options import RunOptions
from rocketkv.harness.query_agnostic import run_cells_query_agnostic
from rocketkv.harness.results import check_output_dir, code_version, environment, write_json_atomic
from rocketkv.harness.sample_runs import STAT_KEYS, run_cells_shared_prefill, run_sample

log = logging.getLogger(__name__)


def build_task(task_cfg: DictConfig) -> Task:
    if "cls" not in task_cfg:
        raise ValueError(f"task config {task_cfg.get('name')!r} has no 'cls' naming its Task class")
    return get_class(task_cfg.cls)(task_cfg)


def select_samples(samples: list[Sample], limit: int | None, shard: tuple[int, int] | None = None,
                   per_subtask: bool = False) -> list[Sample]:
    """The first ``limit`` samples (of every subtask with ``per_subtask``), then every n-th of them from offset i
    when sharded."""
    if limit is None:
        chosen = samples
    elif per_subtask:
        taken: dict[str, int] = {}
        chosen = []
        for s in samples:
            if taken.get(s.subtask, 0) < limit:
                taken[s.subtask] = taken.get(s.subtask, 0) + 1
                chosen.append(s)
    else:
        chosen = samples[:limit]
    if shard is not None:
        chosen = chosen[shard[0]::shard[1]]
    return chosen


def build_prompts(tokenizer, spec: ModelSpec, samples: list[Sample], task: Task) -> dict[str, list[list[int]]]:
    """The token ids of every sample's rows, built with the model's prompt rules (format, BOS, cap); a
    conversation's rows are its turns."""
    if task.multi_turn:
        return {s.id: conversation_token_ids(tokenizer, s, spec.max_len, context_alone=not task.query_aware)
                for s in samples}
    rules = spec.prompt_rules()
    return {s.id: prompt_rows(tokenizer, s, spec.chat_template, spec.max_len, rules) for s in samples}


def summarise(task: Task, records: list[dict], run_info: dict) -> dict:
    metrics = task.aggregate(records)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    metrics["n_samples"] = len(records)
    counted = [r for r in records if r.get("score") is not None]  # a task scores warm-up samples None
    metrics["stats"] = {k: mean([r["stats"][k] for r in counted if r.get("stats", {}).get(k) is not None])
                        for k in STAT_KEYS}
    decode_s = sum(r["time_decode_s"] for r in counted)
    metrics["timing"] = {
        "prefill_s_mean": mean([r["time_prefill_s"] for r in counted]),
        "decode_s_mean": mean([r["time_decode_s"] for r in counted]),
        "decode_tokens_per_s": (sum(r["new_tokens"] for r in counted) / decode_s) if decode_s > 0 else None,
        "peak_mem_bytes_max": max((r.get("peak_mem_bytes") or 0 for r in counted), default=None),
    }
    metrics["run"] = run_info
    return metrics


def run(cfg: DictConfig) -> list[dict]:
    """Run (or resume) one configuration, or every cell of ``grid.methods`` x ``grid.budgets`` with one
    prefill per sample; returns the metrics of each cell."""
    options = RunOptions.from_cfg(cfg)
    task = build_task(cfg.task)
    task.query_aware  # noqa: B018 -- a bad or unsupported task.query_aware stops the run here
    spec = ModelSpec.from_cfg(OmegaConf.to_container(cfg.model, resolve=True))
    if spec.random_weights and task.measures_accuracy:
        raise ValueError(f"model={spec.name} has random weights (its architecture only, for speed and memory "
                         f"studies): task={cfg.task.name} measures accuracy; use task=efficiency, or a model with "
                         "trained weights")
    task.validate(spec.max_len)
    cells = [make_cell(c, spec.name, options.shard) for c in grid_configs(cfg)]

    finished = [finished_metrics(cell, options.limit, options.shard) for cell in cells]
    if all(finished):
        for cell, metrics in zip(cells, finished):
            restore_cell_config(cell)
            print(f"{cell.label}: already complete, score {metrics['score']:.2f}{task.metrics_line(metrics)} over "
                  f"{metrics['n_samples']} samples -> {cell.out_dir}")
        return finished
    check_output_dir(cfg.output_dir)
    check_memory(spec)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    with ExitStack() as held:
        locks = [held.enter_context(lock_cell(cell)) for cell in cells]  # before the model: a busy cell fails at once
        model, tokenizer = load_model(spec)
        task.prompt_format = spec.prompt_rules()  # tasks that size prompts in tokens (RULER) build them this way
        task.limit = options.limit  # tasks that generate their samples (RULER) make only the ones the run takes
        samples = select_samples(task.samples(tokenizer, spec.max_len), options.limit, options.shard,
                                 per_subtask=task.limit_scope == "subtask")
        todo = [s for s in samples if any(s.id not in c.preds.done() for c in cells)]
        prompts = build_prompts(tokenizer, spec, todo, task)
        valid = check_plans(cells, todo, prompts, AttentionShape.of(model), spec.plan_max_len,
                            skip=options.skip_invalid)
        for cell, lock in zip(cells, locks):
            if not any(cell is v for v in valid):
                lock.release()
        return _run_locked(cfg, options, task, spec, valid, model, tokenizer, samples, prompts)


def _run_locked(cfg, options: RunOptions, task, spec, cells, model, tokenizer, samples, prompts) -> list[dict]:
    context = task.context(model)
    todo = [s for s in samples if any(s.id not in c.preds.done() for c in cells)]
    env = environment(str(model.device))
    for cell in cells:
        write_cell_config(cell)
        write_json_atomic(cell.out_dir / "env.json", env)
    desc = cells[0].label if len(cells) == 1 else f"{cfg.task.name}/{spec.name}/grid of {len(cells)}"
    bar = tqdm(todo, desc=desc, disable=not options.progress, dynamic_ncols=True)
    for sample in bar:
        progress.track(bar)  # a long sample shows its prefill and decoded tokens on the bar
        rows = prompts[sample.id]
        pending = [c for c in cells if sample.id not in c.preds.done()]
        if task.multi_turn:  # one cache carried over the turns, per cell
            for cell in pending:
                cell.preds.append(run_conversation(model, tokenizer, spec, sample, rows, cell, task))
            continue
        if not task.query_aware:  # the context compressed before the question is fed
            for cell, record in zip(pending, run_cells_query_agnostic(model, tokenizer, spec, sample, rows, pending,
                                                                      task)):
                cell.preds.append(record)
            continue
        shareable = [c for c in pending if c.method.decode_last_prompt_token and len(rows[0]) >= 2]
        if len(shareable) < 2:
            shareable = []
        for cell, record in zip(shareable, run_cells_shared_prefill(model, tokenizer, spec, sample, rows, shareable,
                                                                    task) if shareable else []):
            cell.preds.append(record)
        for cell in pending:
            if cell not in shareable:
                cell.preds.append(run_sample(model, tokenizer, spec, sample, rows, cell, task))
    progress.track(None)

    results = [finish_cell(cell, task, spec, samples, options, context) for cell in cells]
    if options.update_leaderboard:
        from rocketkv.harness.report import update_leaderboard

        update_leaderboard(cfg.output_dir, plots=False)
    for cell, metrics in zip(cells, results):
        print(f"{cell.label}: {task.score_name} {metrics['score']:.2f}{task.metrics_line(metrics)} over "
              f"{metrics['n_samples']} samples -> {cell.out_dir}")
    table = task.summary(results)
    if table:
        print(table)
    return results


def finish_cell(cell: Cell, task: Task, spec: ModelSpec, samples: list[Sample], options: RunOptions,
                context: dict) -> dict:
    wanted = [s.id for s in samples]
    records = [cell.preds.records[i] for i in wanted if i in cell.preds.records]
    shard = options.shard
    run_info = {"task": cell.cfg.task.name, "model": spec.name, "method": cell.name, "budget": cell.budget,
                "reference": cell.method.is_reference, "config_hash": cell.config_hash,
                "protocol_hash": stable_hash(run_protocol(task.hashed_protocol(), spec)),
                "protocol": run_protocol(task.hashed_protocol(), spec), "code_version": code_version(),
                "complete": len(records) == len(wanted), "n_expected": len(wanted),
                "results_dir": str(cell.out_dir), "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
                "limit": options.limit}
    metrics = summarise(task, records, run_info)
    if context:
        metrics["context"] = context
    write_json_atomic(cell.out_dir / metrics_name(shard), metrics)
    return metrics
