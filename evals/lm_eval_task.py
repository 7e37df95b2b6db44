"""``task=lm_eval``: lm-eval generation tasks run by our runner, scored with lm-eval's own metrics.

lm-eval builds the requests (few-shot context, ``until``, ``max_gen_toks``) and scores the answers (its filters,
``process_results`` and ``aggregation``); our runner does the rest, so resume, compression statistics and the
results tree work as for every other task.  Differences from running lm-eval itself:

- prompts longer than the model's context are truncated in the middle (our runner) instead of on the left;
- decoding is always greedy, and each generation-kwargs ``until`` list is followed, plus EOS; a task or
  ``gen_kwargs`` asking for sampling (or beams, penalties, ...) is refused (``greedy_gen_kwargs``);
- ``score`` (the headline) is one metric of each task, ``task.metric`` or else the task's first (x100 when it
  lies in [0, 1]), averaged over the tasks with equal weight; lm-eval's group aggregates (e.g. size-weighted) are
  not reproduced.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from evals.base import Sample, Task

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default when a task sets none
# Generation kwargs a greedy decode honours, and sampling-only ones that greedy decoding leaves without effect.
GREEDY_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")
SAMPLING_ONLY_KEYS = ("top_p", "top_k", "min_p", "typical_p")


def greedy_gen_kwargs(gen_kwargs: dict, where: str) -> dict:
    """lm-eval's normalised generation kwargs when a greedy decode does what they ask; otherwise a ``ValueError``
    naming what was asked (sampling, beams, penalties, ...) and what is supported: nothing else is run instead."""
    from lm_eval.models.utils import normalize_gen_kwargs

    kwargs = dict(normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS))
    if kwargs.get("do_sample"):
        raise ValueError(f"{where} asks for sampling (do_sample={gen_kwargs.get('do_sample')!r}, "
                         f"temperature={gen_kwargs.get('temperature')!r}): rocketkv decodes greedily only; "
                         "drop do_sample/temperature from --gen_kwargs (or set do_sample=False)")
    other = sorted(k for k in kwargs if k not in GREEDY_KEYS + SAMPLING_ONLY_KEYS)
    if other:
        raise ValueError(f"{where} sets generation kwargs {other} ({', '.join(f'{k}={kwargs[k]!r}' for k in other)}), "
                         f"which rocketkv's greedy decode does not support; supported: until, max_gen_toks "
                         f"(or max_new_tokens), do_sample=False, temperature=0")
    return kwargs


def _names(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [n.strip() for n in raw.split(",") if n.strip()]
    return [str(n) for n in raw]


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _percent(value: float | None) -> float:
    if value is None:
        return float("nan")
    return value * 100 if 0.0 <= value <= 1.0 else value


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def strip_bos(text: str, tokenizer: Any) -> str:
    """Drop a BOS string the prompt starts with (chat templates render one) when the tokenizer adds BOS itself.

    lm-eval's HF model encodes such prompts without special tokens; our runner always adds them.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    adds_bos = tokenizer("", add_special_tokens=True).input_ids[:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos else text


class LmEvalTask(Task):
    name = "lm_eval"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._tasks: dict[str, Any] | None = None  # lm-eval task name -> lm-eval Task
        self._instances: dict[tuple[str, int], Any] = {}  # (task, doc_id) -> the Instance lm-eval would send
        self._metric_cache: dict[tuple[str, int, str], dict] = {}

    def _opt(self, key: str, default: Any = None) -> Any:
        value = self.cfg.get(key, default)
        return default if value is None else value

    @property
    def names(self) -> list[str]:
        return _names(self.cfg.get("names"))

    def _check_names(self) -> None:
        if not self.names:
            raise ValueError("task=lm_eval needs lm-eval task names, e.g. task.names=[gsm8k] "
                             "or task.names=[niah_single_1]")

    def validate(self, model_max_len: int) -> None:
        """Names, the headline metric and each task's generation kwargs, before any model is loaded."""
        self._check_names()
        self._load()
        self._check_metric()

    # ------------------------------------------------------------------ loading
    def _load(self) -> dict[str, Any]:
        if self._tasks is not None:
            return self._tasks
        from lm_eval.defaults import DEFAULT_OTHER_SEED
        from lm_eval.tasks import TaskManager

        self._check_names()
        include = self.cfg.get("include_path")
        include = _names(include) if include else None
        metadata = _plain(self._opt("metadata", {}))
        manager = TaskManager(include_path=include, include_defaults=bool(self._opt("include_defaults", True)),
                              metadata=metadata or None)
        tasks = manager.load(self.names)["tasks"]
        gen_kwargs = _plain(self.cfg.get("gen_kwargs"))
        num_fewshot = self.cfg.get("num_fewshot")
        for name, task in tasks.items():
            output_type = task.get_config("output_type")
            if output_type != "generate_until":
                raise ValueError(f"lm-eval task {name!r} has output_type {output_type!r}: task=lm_eval runs generation "
                                 "(generate_until) tasks only, since a compressed KV cache acts at decode time and "
                                 "cannot score log-likelihoods")
            # The same per-task settings lm_eval.simple_evaluate applies.
            if gen_kwargs:
                task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=int(num_fewshot))
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=int(self._opt("fewshot_seed", DEFAULT_OTHER_SEED)))
            greedy_gen_kwargs(task.get_config("generation_kwargs") or {}, f"lm-eval task {name!r}")
        self._tasks = tasks
        return tasks

    def _build(self, tokenizer: Any | None) -> None:
        """Ask lm-eval for each task's requests; ``tokenizer=None`` (scoring only) skips the chat template."""
        chat = bool(self._opt("apply_chat_template", False)) and tokenizer is not None
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("task.apply_chat_template=true but the tokenizer has no chat template")

        def render(history, add_generation_prompt=True):  # as lm-eval's HFLM.apply_chat_template
            return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=not add_generation_prompt)

        for name, task in self._load().items():
            task.build_all_requests(limit=self.cfg.get("limit_per_task"), rank=0, world_size=1,
                                    system_instruction=self.cfg.get("system_instruction"), apply_chat_template=chat,
                                    fewshot_as_multiturn=bool(self._opt("fewshot_as_multiturn", False)),
                                    chat_template=render if chat else None,
                                    tokenizer_name=getattr(tokenizer, "name_or_path", "") if chat else "")
            for inst in task.instances:
                self._instances[(name, inst.doc_id)] = inst

    # ------------------------------------------------------------------ samples
    def samples(self, tokenizer: Any, model_max_len: int) -> list[Sample]:
        self._build(tokenizer)
        self._check_metric()
        out = []
        for (name, doc_id), inst in self._instances.items():
            context, gen_kwargs = inst.args[0], inst.args[1]
            kwargs = greedy_gen_kwargs(gen_kwargs, f"lm-eval task {name!r}")
            out.append(Sample(
                id=f"{name}/{doc_id}", prompt=strip_bos(context, tokenizer),
                references=self._references(name, inst.doc), max_new_tokens=int(kwargs["max_gen_toks"]),
                chat_template=False,  # lm-eval renders the template into the context when asked to
                stop=[s for s in kwargs["until"] if s], subtask=name, meta={"lm_eval_task": name, "doc_id": doc_id},
            ))
        return out

    def _references(self, name: str, doc: dict) -> list[str]:
        task = self._load()[name]
        target = task.doc_to_target(doc)
        if isinstance(target, int) and task.config.doc_to_choice is not None:
            target = task.doc_to_choice(doc)[target]
        return [str(t) for t in target] if isinstance(target, (list, tuple)) else [str(target)]

    # ------------------------------------------------------------------ scoring
    def _metrics(self, name: str, doc_id: int, prediction: str) -> dict[str, Any]:
        """``{"<metric>,<filter>": value}`` for one answer, as lm-eval's evaluator computes them."""
        key = (name, doc_id, prediction)
        if key not in self._metric_cache:
            if not self._instances:
                self._build(None)  # scoring only needs the docs
            task = self._load()[name]
            inst = self._instances[(name, doc_id)]
            out: dict[str, Any] = {}
            for ensemble in task._filters:
                probe = dataclasses.replace(inst, resps=[prediction] * (inst.repeats or 1), filtered_resps={})
                ensemble.apply([probe])
                for metric, value in task.process_results(inst.doc, [probe.filtered_resps[ensemble.name]]).items():
                    out[f"{metric},{ensemble.name}"] = value
            self._metric_cache[key] = out
        return self._metric_cache[key]

    def _headline(self, metrics: dict[str, Any]) -> str | None:
        """The key of the headline metric among one task's ``{"<metric>,<filter>": value}``: ``task.metric``
        (``exact_match`` or ``exact_match,none``), else the first."""
        wanted = self.cfg.get("metric")
        if not wanted:
            return next(iter(metrics), None)
        return next((key for key in metrics if wanted in (key, key.split(",")[0])), None)

    def _check_metric(self) -> None:
        wanted = self.cfg.get("metric")
        if not wanted:
            return
        for name, task in self._load().items():
            keys = [f"{m},{f.name}" for f in task._filters for m in task.aggregation()]
            if not any(wanted in (key, key.split(",")[0]) for key in keys):
                raise ValueError(f"task.metric={wanted!r} is not a metric of lm-eval task {name!r}; "
                                 f"valid: {', '.join(keys)}")

    def score(self, sample: Sample, prediction: str) -> float:
        metrics = self._metrics(sample.meta["lm_eval_task"], sample.meta["doc_id"], prediction)
        # Corpus-level metrics (bleu, ...) give non-numeric items per answer; only the aggregate scores them.
        return _percent(_number(metrics.get(self._headline(metrics))))

    def aggregate(self, records: list[dict]) -> dict:
        from lm_eval.api.metrics import mean

        raw: dict[str, dict[str, list]] = {}
        for r in records:
            name = r["meta"]["lm_eval_task"]
            for key, value in self._metrics(name, r["meta"]["doc_id"], r["prediction"]).items():
                raw.setdefault(name, {}).setdefault(key, []).append(value)
        subtasks = {}
        for name in sorted(raw):
            aggregation = self._load()[name].aggregation()
            metrics = {}
            for key, values in raw[name].items():
                value = aggregation.get(key.split(",")[0], mean)(values)
                metrics[key] = value if _number(value) is None else _number(value)
            headline = self._headline(metrics)
            subtasks[name] = {"score": _percent(_number(metrics[headline])), "n": len(raw[name][headline]),
                              "metric": headline, "metrics": metrics}
        scores = [s["score"] for s in subtasks.values()]
        return {"score": sum(scores) / len(scores) if scores else float("nan"), "subtasks": subtasks}

    def metrics_line(self, metrics: dict) -> str:
        """Every metric of every task, for the runner's one-line summary (the headline is one of them)."""
        subtasks = metrics.get("subtasks", {})
        parts = [f"{name + '/' if len(subtasks) > 1 else ''}{key} {_number(value):.4g}"
                 for name, sub in subtasks.items() for key, value in sub.get("metrics", {}).items()
                 if _number(value) is not None]
        return f" ({'; '.join(parts)})" if parts else ""

    def protocol(self) -> dict:
        from importlib import metadata

        keys = ("names", "include_path", "num_fewshot", "fewshot_seed", "apply_chat_template", "fewshot_as_multiturn",
                "system_instruction", "gen_kwargs", "metadata", "limit_per_task")
        cfg = {k: _plain(self.cfg.get(k)) for k in keys}
        cfg["names"] = self.names
        if self.cfg.get("metric"):  # the headline's choice; absent at its default, so earlier results keep theirs
            cfg["metric"] = self.cfg.get("metric")
        return {"task": self.name, **cfg, "lm_eval_version": metadata.version("lm_eval"),
                "truncation": "middle", "decoding": "greedy"}
