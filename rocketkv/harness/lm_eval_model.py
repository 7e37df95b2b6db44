"""lm-eval model ``rocketkv``: lm-eval's Hugging Face model with a compressed KV cache for generation requests.

    lm_eval.simple_evaluate(model=RocketKVLM(pretrained=model, tokenizer=tok, method="snapkv", budget=256), ...)
    rocketkv-lm-eval --model rocketkv --model_args pretrained=<path>,method=rocketkv,budget=256,window=32 --tasks ...

Every ``generate_until`` request runs greedy decoding, batch size 1, inside ``rocketkv.compress`` with a fresh
cache; per-request budget statistics are kept in ``request_stats``.  Without ``method=`` it runs RocketKV at
budget 256 (said in a warning and in the results' ``config.kv_method``/``kv_budget``).  What it cannot do is
refused with one error, never replaced by something else: ``--batch_size`` other than 1, sampling or other
non-greedy ``--gen_kwargs``, an unknown ``--model_args`` key.

Log-likelihood requests (``loglikelihood``, ``loglikelihood_rolling``, multiple choice) raise by default: the
methods only change decode-time attention, so a continuation scored in one forward pass would see the full
cache and measure the dense model.  ``loglikelihood=dense`` scores them with full attention, with a warning.
``method=full`` scores them as lm-eval's ``hf`` model does (nothing is compressed there).
"""
from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import handle_arg_string
from tqdm import tqdm

from evals.lm_eval_task import greedy_gen_kwargs
from rocketkv.harness.generation import greedy_generate
from rocketkv.core.methods import METHODS, make_method
from rocketkv.core import check_model, compress

log = logging.getLogger(__name__)

LOGLIKELIHOOD_POLICIES = ("error", "dense")
STAT_KEYS = ("kept_tokens", "attended_tokens", "elements_read_per_step", "bytes_read_per_step", "stored_kv_bytes")
DEFAULT_METHOD, DEFAULT_BUDGET = "rocketkv", 256
OWN_ARGS = ("method", "budget", "loglikelihood", "model_max_len")
# Keys lm-eval's hf model hands on to ``from_pretrained`` that we let through (its **kwargs take anything, so an
# unknown key would otherwise surface as a transformers error far from the typo).
PRETRAINED_ARGS = ("attn_implementation", "cache_dir", "local_files_only", "low_cpu_mem_usage", "token")


class BridgeError(ValueError):
    """A ``--model_args``/``--batch_size``/``--gen_kwargs`` value the rocketkv model refuses (one line from the CLI)."""


def hf_arg_names() -> set[str]:
    return {name for name, p in inspect.signature(HFLM.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_model_args(keys) -> None:
    """Every ``--model_args`` key must be one of ours, a method option, lm-eval hf's or a from_pretrained one."""
    groups = {"rocketkv": OWN_ARGS, "method options": sorted(method_option_names()),
              "lm-eval hf": sorted(hf_arg_names()), "from_pretrained": PRETRAINED_ARGS}
    valid = {name for names in groups.values() for name in names}
    bad = sorted(k for k in keys if k not in valid)
    if bad:
        close = {k: difflib.get_close_matches(k, sorted(valid), n=1) for k in bad}
        hint = "".join(f" (did you mean {m[0]!r} for {k!r}?)" for k, m in close.items() if m)
        raise BridgeError(f"unknown --model_args key(s) {', '.join(map(repr, bad))}{hint}; valid: "
                          + "; ".join(f"{group}: {', '.join(names)}" for group, names in groups.items()))


def method_option_names() -> set[str]:
    """Options of any registered method; ``make_method`` rejects the ones the chosen method lacks."""
    names: set[str] = set()
    for cls in METHODS.values():
        names |= set(cls.__dataclass_fields__)
    return names - {"budget", "extra"}


def coerce(value: Any) -> Any:
    """``--model_args`` values may arrive as strings (dict model_args, Python callers): "32" -> 32, "true" -> True."""
    return handle_arg_string(value) if isinstance(value, str) else value


def check_args(method: Any, budget: Any, loglikelihood: Any, batch_size: Any, others: dict) -> tuple[Any, dict]:
    """The method these ``--model_args`` ask for and its options; a ``BridgeError`` for anything refused."""
    check_model_args(others)
    options = {k: coerce(v) for k, v in others.items() if k in method_option_names()}
    try:
        built = make_method(DEFAULT_METHOD if method is None else str(method),
                            budget=DEFAULT_BUDGET if budget is None else coerce(budget), **options)
    except ValueError as err:
        raise BridgeError(str(err)) from None
    if loglikelihood not in LOGLIKELIHOOD_POLICIES:
        raise BridgeError(f"loglikelihood={loglikelihood!r} is not valid; use one of {LOGLIKELIHOOD_POLICIES}")
    if batch_size is not None and str(batch_size) != "1":
        raise BridgeError(f"batch_size={batch_size} is not supported: rocketkv decodes one request at a time, "
                          "each with its own compressed cache; leave --batch_size out (or pass 1)")
    return built, options


def check_cli_args(model_args: str, batch_size: Any) -> None:
    """``--model_args``/``--batch_size`` of ``rocketkv-lm-eval --model rocketkv``, checked before lm-eval starts."""
    from lm_eval.utils import simple_parse_args_string

    try:
        args = simple_parse_args_string(model_args or "")
    except Exception:  # noqa: BLE001 - a form lm-eval reads otherwise (JSON, ...): the model's own checks apply
        return
    check_args(args.pop("method", None), args.pop("budget", None), args.pop("loglikelihood", "error"),
               batch_size, {k: v for k, v in args.items() if k != "model_max_len"})


@register_model("rocketkv")
class RocketKVLM(HFLM):
    def __init__(self, pretrained: Any, method: str | None = None, budget: Any = None,
                 loglikelihood: str = "error", model_max_len: Any = None, batch_size: Any = 1,
                 device: str | None = None, **kwargs: Any) -> None:
        # Built once, for every request; fails on a bad key, method, budget or option before any model is loaded.
        self.method, self.method_options = check_args(method, budget, loglikelihood, batch_size, kwargs)
        for key in self.method_options:
            kwargs.pop(key)
        self.defaults_used = [name for name, value in (("method", method), ("budget", budget)) if value is None]
        self.method_name, self.budget = self.method.name, self.method.budget
        self.uses_budget = self.method.uses_budget
        if not self.uses_budget and "method" not in self.defaults_used:
            self.defaults_used = []
        self.loglikelihood_policy = loglikelihood
        if self.defaults_used:
            log.warning("rocketkv: no %s in --model_args, running %s (defaults: method=%s, budget=%d; method=full "
                        "runs the uncompressed model)", " or ".join(f"{n}=" for n in self.defaults_used), self.label,
                        DEFAULT_METHOD, DEFAULT_BUDGET)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, batch_size=1, device=device, **kwargs)
        check_model(self.model)
        self._model_max_len = coerce(model_max_len)
        self.request_stats: list[dict] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ generation
    @property
    def label(self) -> str:
        return f"{self.method_name}@{self.budget if self.uses_budget else 'full'}"

    @property
    def model_max_len(self) -> int:
        return int(self._model_max_len or self.max_length)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for req in requests:  # refuse what greedy decoding cannot do before the first request runs
            self._gen_kwargs(req)
        first = len(self.request_stats)
        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc=f"rocketkv {self.label}"):
            context, gen_kwargs = req.args[0], req.args[1]
            text = self._generate_one(context, gen_kwargs, eos, req)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        self._log_summary(self.request_stats[first:])
        return out

    def _gen_kwargs(self, req) -> dict:
        gen_kwargs = dict(req.args[1])
        try:
            greedy_gen_kwargs(gen_kwargs, f"task {getattr(req, 'task_name', None) or '<unnamed>'!r}")
        except ValueError as err:
            raise BridgeError(str(err)) from None
        return normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)

    def _generate_one(self, context: str, gen_kwargs: dict, eos: str, req) -> str:
        kwargs = self._gen_kwargs(req)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = kwargs.pop("max_gen_toks")
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks={max_gen} must be below the model's max length {self.max_length}")
        # Same encoding and left truncation as HFLM.generate_until, for one context.
        ids, _ = self.tok_batch_encode([context], left_truncate_len=self.max_length - max_gen,
                                       truncation=self.truncation)
        ids = ids[0].tolist()
        with compress(self.model, self.method, max_new_tokens=max_gen, model_max_len=self.model_max_len) as session:
            cache = session.new_cache(max_gen)
            gen = greedy_generate(self.model, self.tokenizer, ids, max_gen, cache, stop=until)
        stats = session.stats()
        self.request_stats.append({
            "task": req.task_name, "doc_id": req.doc_id, "prompt_tokens": len(ids), "new_tokens": len(gen.token_ids),
            "time_prefill_s": gen.time_prefill_s, "time_decode_s": gen.time_decode_s,
            **{k: stats.get(k) for k in STAT_KEYS}, "budget_params": session.plan or {},
        })
        text = gen.text
        if isinstance(self.think_end_token, int) and self.think_end_token in gen.token_ids:
            last = len(gen.token_ids) - 1 - gen.token_ids[::-1].index(self.think_end_token)
            text = self.tok_decode(gen.token_ids[last + 1:]).lstrip()
        think_end = self.think_end_token if isinstance(self.think_end_token, str) else None
        return postprocess_generated_text(text, stop=until, think_end_token=think_end)

    def stats_summary(self, records: list[dict] | None = None) -> dict:
        """Means of the per-request statistics (all requests so far by default)."""
        records = self.request_stats if records is None else records
        summary: dict[str, Any] = {"requests": len(records)}
        for k in ("prompt_tokens", "new_tokens", *STAT_KEYS):
            vals = [r[k] for r in records if r.get(k) is not None]
            summary[k] = sum(vals) / len(vals) if vals else None
        return summary

    def _log_summary(self, records: list[dict]) -> None:
        if records:
            s = self.stats_summary(records)
            log.info("kv method %s, budget %s: %d requests, mean prompt %.0f tokens, kept %.1f, attended %.1f per step",
                     self.method_name, self.budget if self.uses_budget else None, s["requests"], s["prompt_tokens"],
                     s["kept_tokens"] or 0.0, s["attended_tokens"] or 0.0)

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._check_loglikelihood(requests, "loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._check_loglikelihood(requests, "loglikelihood_rolling")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _check_loglikelihood(self, requests, kind: str) -> None:
        tasks = sorted({r.task_name for r in requests if getattr(r, "task_name", None)}) or ["<unnamed>"]
        if self.method.is_reference:  # nothing is compressed: the dense score is the right one
            return
        if self.loglikelihood_policy == "error":
            raise NotImplementedError(
                f"task(s) {', '.join(tasks)} send {kind} requests, which a compressed KV cache cannot score: "
                f"the {self.method_name!r} method acts at decode time only, so scoring a continuation in one "
                "forward pass would measure the dense model. Use generation (generate_until) tasks, or pass "
                "loglikelihood=dense in --model_args to score them with full attention (no compression).")
        self._warn_once(kind, f"loglikelihood=dense: {kind} requests of {', '.join(tasks)} are scored with FULL "
                              f"attention; {self.method_name!r} is not applied to them")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update({"kv_method": self.method_name, "kv_budget": self.budget if self.uses_budget else None,
                     "kv_defaults_used": list(self.defaults_used),
                     "kv_method_options": dict(self.method_options), "loglikelihood": self.loglikelihood_policy,
                     "kv_stats": self.stats_summary()})
        return info
