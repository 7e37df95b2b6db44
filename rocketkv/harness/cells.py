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
from rocketkv.harness.errors import CellBusy
from rocketkv.harness.results import PredictionLog, run_dir

log = logging.getLogger(__name__)

METHOD_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "method"


UNHASHED_METHOD_OPTIONS = ("cuda_graphs", "compile")  # how the decode steps are launched, not what they compute


def predictions_name(shard: tuple[int, int] | None) -> str:
    return "predictions.jsonl" if shard is None else f"predictions.shard-{shard[0]}-of-{shard[1]}.jsonl"


def metrics_name(shard: tuple[int, int] | None) -> str:
    return "metrics.json" if shard is None else f"metrics.shard-{shard[0]}-of-{shard[1]}.json"


# Options added after results existed: left out of the hash while they keep these values (which give the earlier
# behaviour), so earlier results keep their folders; any other value is hashed like every other option.
LATER_OPTIONS = {
    "model": {"cuda_dtype": "bfloat16", "prompt_format": "chat_template", "add_bos": "auto", "max_prompt_len": None,
              "plan_len_cap": None, "special_tokens": "skip"},
    "task": {"haystack_file": None, "length_unit": "tokens", "key_digits": 7, "max_new_tokens": None,
             "metric": None, "turn_format": "raw", "plan_length": "conversation", "last_answer_token": "fed",
             "query_aware": True},
}


# Where a task caches generated data does not change predictions: any cache folder is hashed as the one every
# earlier result had (RULER's former default), so a cache that follows output_dir keeps results in their folders.
CACHE_FOLDER_HASHED_AS = {"cache_dir": "results/cache/ruler"}


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
    for key, fixed in CACHE_FOLDER_HASHED_AS.items():
        if group == "task" and out.get(key) is not None:
            out[key] = fixed
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


# Run-level method options (null: each method's own value), applied to every compressed method of a run, grid
# cells included: (what is valid, the message's hint).  ``window``/``decode_last_prompt_token`` hold SCBench's
# official values under the paper protocol (conf/protocol_task/paper/scbench.yaml).
RUN_METHOD_OPTIONS = {
    "skip_layers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (the first layers kept dense by every "
                                                     "compressed method)"),
    "window": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (the observation window of every compressed "
                                                "method)"),
    "decode_last_prompt_token": (lambda v: isinstance(v, bool), "true or false (false: a prompt's or turn's last "
                                                                "token is prefilled with the rest)"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def with_run_options(cfg: DictConfig) -> DictConfig:
    """The cell's config with the run-level method options applied (when set) to every compressed method, so a
    grid's cells and a separate run of each get the same method (and folder)."""
    given = {key: cfg.get(key, None) for key in RUN_METHOD_OPTIONS if cfg.get(key, None) is not None}
    for key, value in given.items():
        valid, hint = RUN_METHOD_OPTIONS[key]
        if not valid(value):
            raise ValueError(f"{key}={value!r} is not valid; give {hint}, or null for each method's own value")
    method = METHODS.get(cfg.method.name)
    if not given or method is None or not method.uses_budget:  # unknown: make_method names it; full KV: nothing
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg.method):  # a method file need not list these options (every method has them)
        for key, value in given.items():
            cfg.method[key] = value
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
    so a plan is dense only when it covers every token any turn can see; or, with ``sample.plan_first_turn``
    (SCBench's official runs), the first turn and one answer."""
    if sample.turns and not sample.plan_first_turn:  # a row may hold the context alone (query-agnostic)
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


class CellLock:
    """This job's hold on a cell's predictions file: a second job on the same cell fails at once.  Taken before the
    model loads; the predictions are read again, and a torn last line cut away, only under it.  ``release`` (also on
    leaving a ``with``) gives it back and removes the cell's folders again when this job created them and wrote
    nothing there (a run that failed before its first sample, or a cell ``grid.skip_invalid`` dropped)."""

    def __init__(self, cell: Cell):
        self.cell = cell
        self.created = not cell.out_dir.exists()
        cell.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(cell.preds.path.with_name(f".{cell.preds.path.stem}.lock"), timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            raise CellBusy(f"another job is already running {cell.label} (lock {self.lock.lock_file}); let it "
                           "finish, or rerun afterwards to resume") from None
        try:
            cell.preds = PredictionLog(cell.preds.path, repair=True)  # what an earlier job finished before us
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> "CellLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self.lock.is_locked:
            return
        self.lock.release()
        lock_file = Path(self.lock.lock_file)
        if self.created and [p.name for p in self.cell.out_dir.iterdir()] == [lock_file.name]:
            lock_file.unlink(missing_ok=True)
            folder = self.cell.out_dir
            for _ in range(5):  # <config_hash>, <budget>, <method>, <model>, <task>: never above runs/
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent


def lock_cell(cell: Cell) -> CellLock:
    return CellLock(cell)


def write_cell_config(cell: Cell) -> None:
    (cell.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cell.cfg, resolve=True))


def restore_cell_config(cell: Cell) -> None:
    """Write a finished cell's ``config.yaml`` again when it was deleted (the cell's other files stay as they are)."""
    path = cell.out_dir / "config.yaml"
    if path.exists():
        return
    try:
        write_cell_config(cell)
        log.warning("%s was missing; written again", path)
    except OSError as err:
        log.warning("%s is missing and cannot be written (%s)", path, err)
