"""The cells of a run: one (method, budget) configuration each, with its method object, its results folder and
its budget plans, from a single ``method``/``budget`` or a ``grid.methods`` x ``grid.budgets`` grid."""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf, open_dict

from evals.base import Sample, stable_hash
from rocketkv.core import AttentionShape, Method, make_method
from rocketkv.core.methods import METHODS
from rocketkv.harness.results import PredictionLog, run_dir

log = logging.getLogger(__name__)

METHOD_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "method"


UNHASHED_METHOD_OPTIONS = ("cuda_graphs",)  # how the decode steps are launched, not what they compute


def predictions_name(shard: tuple[int, int] | None) -> str:
    return "predictions.jsonl" if shard is None else f"predictions.shard-{shard[0]}-of-{shard[1]}.jsonl"


def metrics_name(shard: tuple[int, int] | None) -> str:
    return "metrics.json" if shard is None else f"metrics.shard-{shard[0]}-of-{shard[1]}.json"


# Options added after results existed: left out of the hash while they keep these values (which give the earlier
# behaviour), so earlier results keep their folders; any other value is hashed like every other option.
LATER_OPTIONS = {
    "model": {"cuda_dtype": "bfloat16", "prompt_format": "chat_template", "add_bos": "auto", "max_prompt_len": None},
    "task": {"haystack_file": None, "length_unit": "tokens", "key_digits": 7, "max_new_tokens": None,
             "query_aware": True},
}


def run_protocol(task_protocol: dict, spec) -> dict:
    """What defines a run's prompts and scoring (its ``protocol_hash``; the leaderboard compares a method with the
    full-KV run of the same protocol): the task's protocol, plus the model's prompt and dtype rules when they are
    not the neutral ones (``spec``: a ``ModelSpec``).  Method options such as ``skip_layers`` are not in it."""
    rules = {key: getattr(spec, key) for key in LATER_OPTIONS["model"]}
    if all(value == LATER_OPTIONS["model"][key] for key, value in rules.items()):
        return task_protocol
    return {**task_protocol, "model_rules": {**rules, "chat_template": spec.chat_template}}


def _hashed(node: DictConfig, group: str) -> dict:
    out = OmegaConf.to_container(node, resolve=True)
    for key, neutral in LATER_OPTIONS[group].items():
        if key in out and out[key] == neutral and isinstance(out[key], bool) == isinstance(neutral, bool):
            out.pop(key)
    return out


def config_hash(cfg: DictConfig, uses_budget: bool) -> str:
    """Hash of everything that changes predictions; not output paths, limits or shards."""
    model = _hashed(cfg.model, "model")
    for k in ("device", "path"):
        model.pop(k, None)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    for k in UNHASHED_METHOD_OPTIONS:
        method.pop(k, None)
    return stable_hash({"model": model, "task": _hashed(cfg.task, "task"), "method": method,
                        "budget": cfg.budget if uses_budget else None, "seed": cfg.seed})


@dataclass
class Cell:
    """One (method, budget) configuration of a run or a grid, with its results folder."""

    cfg: DictConfig  # the config a separate run of this cell would have
    method: Method  # built once, used for every sample
    out_dir: Path
    preds: PredictionLog
    config_hash: str
    model_name: str
    plans: dict = field(default_factory=dict)  # (prompt_len, max_new_tokens) -> the method's plan

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def budget(self) -> int | None:
        return self.method.budget

    @property
    def label(self) -> str:
        return f"{task_folder(self.cfg.task)}/{self.model_name}/{self.name}@{self.budget or 'full'}"

    def plan(self, prompt_len: int, max_new_tokens: int, shape: AttentionShape, model_max_len: int) -> dict:
        """The method's plan for a sample of these lengths, computed once per shape."""
        key = (prompt_len, max_new_tokens)
        if key not in self.plans:
            self.plans[key] = self.method.plan(prompt_len, max_new_tokens, shape.head_dim, model_max_len,
                                               group_size=shape.group_size)
        return self.plans[key]


QUERY_AGNOSTIC = ".query_agnostic"


def task_folder(task_cfg: DictConfig) -> str:
    """The task's folder under ``runs/``: its name, with ``.query_agnostic`` in the query-agnostic mode, so the two
    modes never share a folder, a reference run or a table."""
    return task_cfg.name if task_cfg.get("query_aware", True) is not False else task_cfg.name + QUERY_AGNOSTIC


def method_options(cfg: DictConfig) -> dict:
    opts = OmegaConf.to_container(cfg.method, resolve=True)
    opts.pop("name", None)
    return opts


def with_run_options(cfg: DictConfig) -> DictConfig:
    """The cell's config with the run-level method options applied: ``skip_layers`` (when set) to every
    compressed method, so a grid's cells and a separate run of each get the same method (and folder)."""
    skip = cfg.get("skip_layers", None)
    if skip is None:
        return cfg
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip_layers={skip!r} is not valid; give an integer >= 0 (the first layers kept dense by "
                         "every compressed method), or null for each method's own value")
    method = METHODS.get(cfg.method.name)
    if method is None or not method.uses_budget:  # unknown: make_method names it; full KV: nothing to skip
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg.method):  # a method file need not list skip_layers (every method has it)
        cfg.method.skip_layers = skip
    return cfg


def make_cell(cfg: DictConfig, model_name: str, shard: tuple[int, int] | None) -> Cell:
    cfg = with_run_options(cfg)
    method = make_method(cfg.method.name, budget=cfg.budget, **method_options(cfg))  # fails before any loading
    chash = config_hash(cfg, method.uses_budget)
    out_dir = run_dir(cfg.output_dir, task_folder(cfg.task), model_name, method.name, method.budget, chash)
    return Cell(cfg, method, out_dir, PredictionLog(out_dir / predictions_name(shard)), chash, model_name)


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


def plan_shape(sample: Sample, rows: list[list[int]]) -> tuple[int, int]:
    """The (prompt length, new tokens) a sample's plan is made for: its prompt's.  For a conversation (``rows``
    are its turns' token ids) the whole conversation: every turn and every answer but the last count as the prompt,
    so a plan is dense only when it covers every token any turn can see."""
    if sample.turns:  # a row may hold the context alone (query-agnostic): answers follow the turns only
        return sum(len(r) for r in rows) + (len(sample.turns) - 1) * sample.max_new_tokens, sample.max_new_tokens
    return len(rows[0]), sample.max_new_tokens


def check_plans(cells: list[Cell], samples: list[Sample], prompts: dict[str, list[list[int]]], shape: AttentionShape,
                model_max_len: int, skip: bool) -> list[Cell]:
    """Plan every cell for every prompt length before any decoding, so a budget that cannot work (e.g. below the
    observation window) fails at once, not half-way through a grid; ``skip`` drops such cells."""
    shapes = sorted({plan_shape(s, prompts[s.id]) for s in samples})
    valid, errors = [], []
    for cell in cells:
        try:
            cell.method.check_shape(shape.num_layers, shape.num_kv_heads)
            for n, new_tokens in shapes:
                cell.plan(n, new_tokens, shape, model_max_len)
            valid.append(cell)
        except ValueError as err:
            errors.append(f"{cell.label}: {err}")
    if errors and not skip:
        raise ValueError("cells that cannot run on these prompts (grid.skip_invalid=true drops them): "
                         + "; ".join(errors))
    for line in errors:
        log.warning("skipped %s", line)
    return valid


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


class CellBusy(RuntimeError):
    """Another job holds the cell's lock."""


def lock_cell(cell: Cell) -> FileLock:
    """Hold the cell's predictions file for this job; a second job on the same cell fails at once."""
    lock = FileLock(cell.preds.path.with_name(f".{cell.preds.path.stem}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CellBusy(f"another job is already running {cell.label} (lock {lock.lock_file}); let it finish, "
                           f"or rerun afterwards to resume") from None
    cell.preds = PredictionLog(cell.preds.path)  # what an earlier job finished before we got the lock
    return lock
