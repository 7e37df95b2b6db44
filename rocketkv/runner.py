"""One evaluation run: a model, a task, a KV method at a budget -> predictions, metrics and env on disk."""
from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from evals.base import Sample, Task, stable_hash
from rocketkv.methods import METHODS, Method, make_method
from rocketkv.models import ModelSpec, load_model
from rocketkv.prompting import prompt_token_ids
from rocketkv.results import PredictionLog, environment, run_dir, write_json_atomic, code_version
from rocketkv.sample_runs import STAT_KEYS, RowBatching, run_cells_shared_prefill, run_sample

log = logging.getLogger(__name__)

METHOD_CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"


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
            if taken.get(s.subtask, 0) < int(limit):
                taken[s.subtask] = taken.get(s.subtask, 0) + 1
                chosen.append(s)
    else:
        chosen = samples[: int(limit)]
    if shard is not None:
        chosen = chosen[shard[0]::shard[1]]
    return chosen


def predictions_name(shard: tuple[int, int] | None) -> str:
    return "predictions.jsonl" if shard is None else f"predictions.shard-{shard[0]}-of-{shard[1]}.jsonl"


@dataclass
class Cell:
    """One (method, budget) configuration of a run or a grid, with its results folder."""

    cfg: DictConfig  # the config a separate run of this cell would have
    method: Method
    options: dict
    budget: int | None
    out_dir: Path
    preds: PredictionLog
    config_hash: str

    @property
    def name(self) -> str:
        return self.cfg.method.name

    @property
    def label(self) -> str:
        return f"{self.cfg.task.name}/{self.out_dir.parts[-4]}/{self.name}@{self.budget or 'full'}"


def make_cell(cfg: DictConfig, model_name: str, shard: tuple[int, int] | None) -> Cell:
    options = method_options(cfg)
    method = make_method(cfg.method.name, budget=cfg.budget, **options)  # bad budgets fail before any loading
    budget = cfg.budget if method.uses_budget else None
    chash = config_hash(cfg, method.uses_budget)
    out_dir = run_dir(cfg.output_dir, cfg.task.name, model_name, cfg.method.name, budget, chash)
    return Cell(cfg, method, options, budget, out_dir, PredictionLog(out_dir / predictions_name(shard)), chash)


def grid_configs(cfg: DictConfig) -> list[DictConfig]:
    """The separate-run configs a grid stands for (just ``cfg`` when no grid is given)."""
    grid = cfg.get("grid") or {}
    methods, budgets = list(grid.get("methods") or []), list(grid.get("budgets") or [])
    if not methods and not budgets:
        return [cfg]
    methods = methods or [cfg.method.name]
    budgets = budgets or [cfg.budget]
    out = []
    for name in methods:
        method_file = METHOD_CONF_DIR / f"{name}.yaml"
        if not method_file.is_file():
            valid = sorted(p.stem for p in METHOD_CONF_DIR.glob("*.yaml"))
            raise ValueError(f"grid.methods: unknown method {name!r}; valid methods: {valid}")
        method_cfg = OmegaConf.load(method_file) if name != cfg.method.name else cfg.method
        uses_budget = METHODS[method_cfg.name].uses_budget
        for budget in budgets if uses_budget else [cfg.budget]:
            cell = OmegaConf.merge(cfg, {"grid": {"methods": [], "budgets": []}})
            cell.method = method_cfg
            cell.budget = budget
            out.append(cell)
    return out


def check_plans(cells: list[Cell], samples: list[Sample], prompts: dict[str, list[int]], model, spec: ModelSpec,
                skip: bool) -> list[Cell]:
    """Resolve every cell's budget plan for every prompt length before any decoding, so a budget that cannot work
    (e.g. below the observation window) fails at once, not half-way through a grid; ``skip`` drops such cells."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    shapes = sorted({(len(prompts[s.id]), s.max_new_tokens) for s in samples})
    valid, errors = [], []
    for cell in cells:
        try:
            for n, new_tokens in shapes:
                cell.method.plan(n, new_tokens, head_dim, spec.max_len, group_size=group)
            valid.append(cell)
        except ValueError as err:
            errors.append(f"{cell.label}: {err}")
    if errors and not skip:
        raise ValueError("cells that cannot run on these prompts (grid.skip_invalid=true drops them):\n  "
                         + "\n  ".join(errors))
    for line in errors:
        log.warning("skipped %s", line)
    return valid


def summarise(task: Task, records: list[dict], run_info: dict) -> dict:
    metrics = task.aggregate(records)
    n = len(records)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    metrics["n_samples"] = n
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
    task = build_task(cfg.task)
    spec = ModelSpec.from_cfg(OmegaConf.to_container(cfg.model, resolve=True))
    task.validate(spec.max_len)
    shard = parse_shard(cfg.get("shard"))
    cells = [make_cell(c, spec.name, shard) for c in grid_configs(cfg)]
    batching = RowBatching.from_cfg(cfg)
    if batching.enabled and task.times_each_cell:
        raise ValueError(f"task={cfg.task.name} scores each cell's own decode time; grid.batch_decode=true and "
                         "grid.speculative=true would time a shared batch: leave both false")

    finished = [finished_metrics(cell, cfg.get("limit"), shard) for cell in cells]
    if all(finished):
        for cell, metrics in zip(cells, finished):
            print(f"{cell.label}: already complete, score {metrics['score']:.2f} over {metrics['n_samples']} samples "
                  f"-> {cell.out_dir}")
        return finished
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(spec)
    samples = select_samples(task.samples(tokenizer, spec.max_len), cfg.get("limit"), shard,
                             per_subtask=task.limit_scope == "subtask")
    todo = [s for s in samples if any(s.id not in c.preds.done() for c in cells)]
    prompts = {s.id: prompt_token_ids(tokenizer, s, spec.chat_template, spec.max_len) for s in todo}
    cells = check_plans(cells, todo, prompts, model, spec, skip=bool((cfg.get("grid") or {}).get("skip_invalid")))
    with ExitStack() as locks:
        for cell in cells:
            cell.out_dir.mkdir(parents=True, exist_ok=True)
            locks.enter_context(lock_cell(cell))
        return _run_locked(cfg, task, spec, shard, cells, model, tokenizer, samples, prompts, batching)


def metrics_name(shard: tuple[int, int] | None) -> str:
    return "metrics.json" if shard is None else f"metrics.shard-{shard[0]}-of-{shard[1]}.json"


def finished_metrics(cell: Cell, limit, shard) -> dict | None:
    """The cell's metrics when an earlier run with the same limit completed it (so no model needs loading)."""
    path = cell.out_dir / metrics_name(shard)
    try:
        metrics = json.loads(path.read_text())
        info = metrics["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("complete") and "limit" in info and info["limit"] == limit \
            and len(cell.preds.records) >= info.get("n_expected", float("inf")):
        return metrics
    return None


def lock_cell(cell: Cell) -> FileLock:
    """Hold the cell's predictions file for this job; a second job on the same cell fails at once."""
    lock = FileLock(cell.preds.path.with_name(f".{cell.preds.path.stem}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"another job is already running {cell.label} (lock {lock.lock_file}); let it finish, "
                           f"or rerun afterwards to resume") from None
    cell.preds = PredictionLog(cell.preds.path)  # what an earlier job finished before we got the lock
    return lock


def _run_locked(cfg, task, spec, shard, cells, model, tokenizer, samples, prompts, batching: RowBatching) -> list[dict]:
    todo = [s for s in samples if any(s.id not in c.preds.done() for c in cells)]
    env = environment(str(model.device))
    for cell in cells:
        (cell.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cell.cfg, resolve=True))
        write_json_atomic(cell.out_dir / "env.json", env)
    desc = cells[0].label if len(cells) == 1 else f"{cfg.task.name}/{spec.name}/grid of {len(cells)}"
    for sample in tqdm(todo, desc=desc, disable=not cfg.get("progress", True), dynamic_ncols=True):
        ids = prompts[sample.id]
        pending = [c for c in cells if sample.id not in c.preds.done()]
        shareable = [c for c in pending if c.method.decode_last_prompt_token and len(ids) >= 2]
        if len(shareable) < 2:
            shareable = []
        for cell, record in zip(shareable, run_cells_shared_prefill(model, tokenizer, spec, sample, ids, shareable,
                                                                    task, batching) if shareable else []):
            cell.preds.append(record)
        for cell in pending:
            if cell not in shareable:
                cell.preds.append(run_sample(model, tokenizer, spec, sample, ids, cell, task))

    results = [finish_cell(cell, task, spec, samples, shard) for cell in cells]
    if cfg.get("update_leaderboard", True):
        from rocketkv.report import update_leaderboard

        update_leaderboard(cfg.output_dir, plots=False)
    for cell, metrics in zip(cells, results):
        print(f"{cell.label}: {task.score_name} {metrics['score']:.2f} over {metrics['n_samples']} samples "
              f"-> {cell.out_dir}")
    table = task.summary(results)
    if table:
        print(table)
    return results


def finish_cell(cell: Cell, task: Task, spec: ModelSpec, samples: list[Sample], shard) -> dict:
    wanted = [s.id for s in samples]
    records = [cell.preds.records[i] for i in wanted if i in cell.preds.records]
    run_info = {"task": cell.cfg.task.name, "model": spec.name, "method": cell.name, "budget": cell.budget,
                "reference": cell.method.is_reference, "config_hash": cell.config_hash,
                "protocol_hash": stable_hash(task.protocol()),
                "protocol": task.protocol(), "code_version": code_version(),
                "complete": len(records) == len(wanted), "n_expected": len(wanted),
                "results_dir": str(cell.out_dir), "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
                "limit": cell.cfg.get("limit")}
    metrics = summarise(task, records, run_info)
    write_json_atomic(cell.out_dir / metrics_name(shard), metrics)
    return metrics
