"""One evaluation run: a model, a task, a KV method at a budget -> predictions, metrics and env on disk."""
from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from evals.base import Sample, Task, stable_hash
from rocketkv.generation import greedy_generate
from rocketkv.methods import make_method
from rocketkv.models import ModelSpec, load_model
from rocketkv.prompting import prompt_token_ids
from rocketkv.results import PredictionLog, environment, run_dir, write_json_atomic, code_version
from rocketkv.session import compress

log = logging.getLogger(__name__)

STAT_KEYS = ("kept_tokens", "attended_tokens", "elements_read_per_step", "bytes_read_per_step", "stored_kv_bytes")


def method_options(cfg: DictConfig) -> dict:
    opts = OmegaConf.to_container(cfg.method, resolve=True)
    opts.pop("name", None)
    return opts


def build_task(task_cfg: DictConfig) -> Task:
    if "cls" not in task_cfg:
        raise ValueError(f"task config {task_cfg.get('name')!r} has no 'cls' naming its Task class")
    return get_class(task_cfg.cls)(task_cfg)


def config_hash(cfg: DictConfig, uses_budget: bool) -> str:
    """Hash of everything that changes predictions; not output paths, limits or shards."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for k in ("device", "path"):
        model.pop(k, None)
    return stable_hash({"model": model, "task": OmegaConf.to_container(cfg.task, resolve=True),
                        "method": OmegaConf.to_container(cfg.method, resolve=True),
                        "budget": cfg.budget if uses_budget else None, "seed": cfg.seed})


def parse_shard(shard: Any) -> tuple[int, int] | None:
    """``"i/n"`` (0-based) -> ``(i, n)``; None or empty -> None."""
    if shard in (None, "", "null"):
        return None
    try:
        index, count = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard={shard!r} is not valid; use i/n with 0 <= i < n, e.g. shard=0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"shard={shard!r} is not valid; use i/n with 0 <= i < n, e.g. shard=0/4")
    return index, count


def select_samples(samples: list[Sample], limit: int | None, shard: tuple[int, int] | None = None) -> list[Sample]:
    """The first ``limit`` samples, then every n-th of them from offset i when sharded."""
    chosen = samples if limit is None else samples[: int(limit)]
    if shard is not None:
        chosen = chosen[shard[0]::shard[1]]
    return chosen


def predictions_name(shard: tuple[int, int] | None) -> str:
    return "predictions.jsonl" if shard is None else f"predictions.shard-{shard[0]}-of-{shard[1]}.jsonl"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_sample(model, tokenizer, spec: ModelSpec, sample: Sample, method_name: str, budget: int | None,
               options: dict, task: Task) -> dict:
    ids = prompt_token_ids(tokenizer, sample, spec.chat_template, spec.max_len)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    with compress(model, method=method_name, budget=budget, max_new_tokens=sample.max_new_tokens,
                  model_max_len=spec.max_len, **options) as session:
        cache = session.new_cache(sample.max_new_tokens)
        gen = greedy_generate(model, tokenizer, ids, sample.max_new_tokens, cache, stop=sample.stop)
    stats = session.stats()
    return {
        "id": sample.id, "subtask": sample.subtask, "meta": sample.meta, "prompt_tokens": len(ids),
        "prediction": gen.text, "references": sample.references, "score": task.score(sample, gen.text),
        "new_tokens": len(gen.token_ids), "time_prefill_s": gen.time_prefill_s, "time_decode_s": gen.time_decode_s,
        "peak_mem_bytes": peak_memory_bytes(model.device), "stats": {k: stats.get(k) for k in STAT_KEYS},
        "budget_params": session.plan or {},
    }


def summarise(task: Task, records: list[dict], run_info: dict) -> dict:
    metrics = task.aggregate(records)
    n = len(records)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    metrics["n_samples"] = n
    metrics["stats"] = {k: mean([r["stats"][k] for r in records if r.get("stats", {}).get(k) is not None])
                        for k in STAT_KEYS}
    decode_s = sum(r["time_decode_s"] for r in records)
    metrics["timing"] = {
        "prefill_s_mean": mean([r["time_prefill_s"] for r in records]),
        "decode_s_mean": mean([r["time_decode_s"] for r in records]),
        "decode_tokens_per_s": (sum(r["new_tokens"] for r in records) / decode_s) if decode_s > 0 else None,
        "peak_mem_bytes_max": max((r.get("peak_mem_bytes") or 0 for r in records), default=None),
    }
    metrics["run"] = run_info
    return metrics


def run(cfg: DictConfig) -> dict:
    """Run (or resume) one configuration; returns metrics.json's content."""
    task = build_task(cfg.task)
    options = method_options(cfg)
    method = make_method(cfg.method.name, budget=cfg.budget, **options)  # bad budgets fail before any loading
    budget = cfg.budget if method.uses_budget else None
    spec = ModelSpec.from_cfg(OmegaConf.to_container(cfg.model, resolve=True))
    task.validate(spec.max_len)
    shard = parse_shard(cfg.get("shard"))
    chash = config_hash(cfg, method.uses_budget)
    out_dir = run_dir(cfg.output_dir, cfg.task.name, spec.name, cfg.method.name, budget, chash)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    preds = PredictionLog(out_dir / predictions_name(shard))

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(spec)
    write_json_atomic(out_dir / "env.json", environment(str(model.device)))
    samples = select_samples(task.samples(tokenizer, spec.max_len), cfg.get("limit"), shard)
    todo = [s for s in samples if s.id not in preds.done()]
    desc = f"{cfg.task.name}/{spec.name}/{cfg.method.name}@{budget if budget is not None else 'full'}"
    for sample in tqdm(todo, desc=desc, disable=not cfg.get("progress", True), dynamic_ncols=True):
        preds.append(run_sample(model, tokenizer, spec, sample, cfg.method.name, budget, options, task))

    wanted = [s.id for s in samples]
    records = [preds.records[i] for i in wanted if i in preds.records]
    run_info = {"task": cfg.task.name, "model": spec.name, "method": cfg.method.name, "budget": budget,
                "config_hash": chash, "protocol_hash": stable_hash(task.protocol()), "protocol": task.protocol(),
                "code_version": code_version(), "complete": len(records) == len(wanted), "n_expected": len(wanted),
                "results_dir": str(out_dir)}
    run_info["shard"] = None if shard is None else f"{shard[0]}/{shard[1]}"
    metrics = summarise(task, records, run_info)
    write_json_atomic(out_dir / ("metrics.json" if shard is None else f"metrics.shard-{shard[0]}-of-{shard[1]}.json"),
                      metrics)
    if cfg.get("update_leaderboard", True):
        from rocketkv.report import update_leaderboard

        update_leaderboard(cfg.output_dir, plots=False)
    print(f"{desc}: score {metrics['score']:.2f} over {len(records)} samples -> {out_dir}")
    return metrics
