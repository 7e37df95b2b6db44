"""SCBench (Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context Methods", arXiv 2412.10319), its
multi-turn mode, from the official jsonl files (``task.data_dir``).

A row: ``{"id": ..., "context": str, "multi_turns": [{"input": str, "answer": str | [str]}, ...]}``, read from
``<data_dir>/scbench_<subset>.jsonl`` (the SCBench code's names) or ``<data_dir>/multi_turn_<subset>.jsonl`` (the
files in the hub's ``data/`` folder).  Prompts are SCBench's non-chat multi-turn templates: the first turn is the
subset's template over the context and the first input, each later one ``{pre_ans}\\n\\n{input}`` with the previous
turn's gold answer (SCBench's default "golden context"; ``task.golden_context=false`` asks the input alone).  The
runner also keeps the model's own answers in the history, between turns.  Metrics are the official ones:
``scbench_kv`` and ``scbench_prefix_suffix`` are InfiniteBench's ``kv_retrieval`` (the answer is a substring of the
prediction), ``scbench_vt`` is ``string_match_all`` (the share of the answer's items found, case-insensitive, rounded
to 2 places); scores are x100.  Each turn decodes the subset's official ``max_new_tokens`` (``task.max_new_tokens``
overrides it).

The official RocketKV runs of SCBench (``+experiment=paper_protocol``, docs/protocol.md) differ in three options:
``task.turn_format=chat_template`` (the tokenizer's chat template, as SCBench's ``create_multiturn_prompt`` with
``use_chat_template=True`` renders it), ``task.plan_length=first_turn`` (the budget plan from the first turn and
one answer) and ``task.last_answer_token=dropped`` (the answer's last generated token, never fed by the decode loop,
is not fed with the next turn either).
"""
from __future__ import annotations

import json
from pathlib import Path

from evals.base import Sample, Task, Turn, int_option, mean_over_turns

SUBSETS = ("scbench_kv", "scbench_prefix_suffix", "scbench_vt")
FIRST_TURN = {  # SCBench's multiturn_templates
    "scbench_kv": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "scbench_prefix_suffix": "{context}\n\n{input}",
    "scbench_vt": "{context}\n\n{input}",
}
FOLLOW_UP = "{pre_ans}\n\n{input}"  # SCBench's multiturn_follow_up_templates for these subsets
MAX_NEW_TOKENS = {"scbench_kv": 150, "scbench_prefix_suffix": 150, "scbench_vt": 30}
METRICS = {"scbench_kv": "kv_retrieval", "scbench_prefix_suffix": "kv_retrieval", "scbench_vt": "string_match_all"}
TURN_FORMATS = ("raw", "chat_template")
PLAN_LENGTHS = ("conversation", "first_turn")
LAST_ANSWER_TOKEN = ("fed", "dropped")
HOW_TO_GET = ("download SCBench's jsonl files from https://huggingface.co/datasets/microsoft/SCBench (folder data/: "
              "multi_turn_kv.jsonl, multi_turn_prefix_suffix.jsonl, multi_turn_vt.jsonl) into one folder and pass "
              "task.data_dir=<that folder>")


def kv_retrieval(prediction: str, answer: str) -> float:
    """InfiniteBench's kv_retrieval as SCBench scores it: the answer is a substring of the prediction."""
    return float(answer in prediction)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """SCBench's string_match_all: the share of the answers found in the prediction (case-insensitive), rounded."""
    return round(sum(a.lower() in prediction.lower() for a in answers) / len(answers), 2)


def subset_path(data_dir: str | Path, subset: str) -> Path:
    folder = Path(data_dir)
    short = subset.removeprefix("scbench_")
    for name in (f"{subset}.jsonl", f"multi_turn_{short}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"task.data_dir={data_dir}: neither {folder / f'{subset}.jsonl'} nor "
                            f"{folder / f'multi_turn_{short}.jsonl'} exists (subset {subset}); {HOW_TO_GET}")


def read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, row {number}: not valid JSON ({err})") from None
        turns = row.get("multi_turns") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("context"), str) or not turns \
                or any(not isinstance(t, dict) or "input" not in t or "answer" not in t for t in turns):
            raise ValueError(f"{path}, row {number}: expected an SCBench row with a string 'context' and a non-empty "
                             "'multi_turns' list of {'input', 'answer'}")
        rows.append(row)
    return rows


def as_list(answer) -> list[str]:
    return [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]


class SCBenchTask(Task):
    name = "scbench"
    multi_turn = True
    limit_scope = "subtask"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.data_dir = cfg.get("data_dir")
        subsets = cfg.get("subsets") or list(SUBSETS)
        subsets = [subsets] if isinstance(subsets, str) else list(subsets)
        bad = [s for s in subsets if s not in SUBSETS]
        if bad:
            raise ValueError(f"task.subsets: {bad} not supported; supported: {list(SUBSETS)}")
        self.subsets = subsets
        max_turns = cfg.get("max_turns")
        self.max_turns = None if max_turns is None else int_option("max_turns", max_turns, 1)
        self.golden_context = bool(cfg.get("golden_context", True))
        new = cfg.get("max_new_tokens")
        self.max_new_tokens = {s: MAX_NEW_TOKENS[s] if new is None else int_option("max_new_tokens", new, 1)
                               for s in self.subsets}
        self.turn_format = choice(cfg, "turn_format", TURN_FORMATS)
        self.plan_length = choice(cfg, "plan_length", PLAN_LENGTHS)
        self.feed_last_answer_token = choice(cfg, "last_answer_token", LAST_ANSWER_TOKEN) == "fed"

    def validate(self, model_max_len: int) -> None:
        if not self.data_dir:
            raise ValueError(f"task=scbench needs its data: {HOW_TO_GET}")
        if not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"task.data_dir={self.data_dir}: no such folder; {HOW_TO_GET}")
        for subset in self.subsets:
            subset_path(self.data_dir, subset)

    def samples(self, tokenizer, model_max_len):
        self.validate(model_max_len)
        if self.turn_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("task.turn_format=chat_template: the tokenizer has no chat template; use "
                             "task.turn_format=raw")
        out = []
        for subset in self.subsets:
            for index, row in enumerate(read_rows(subset_path(self.data_dir, subset))):
                out.append(self._sample(subset, index, row, tokenizer))
        return out

    def _sample(self, subset: str, index: int, row: dict, tokenizer=None) -> Sample:
        turns = row["multi_turns"][: self.max_turns]
        if self.turn_format == "chat_template":
            first, prompts = chat_turns(tokenizer, subset, row["context"], turns, self.golden_context)
        else:
            first, _, question = FIRST_TURN[subset].partition("{context}")
            first += row["context"]
            prompts = [question.format(input=turns[0]["input"])]
            for previous, turn in zip(turns, turns[1:]):
                pre = ", ".join(as_list(previous["answer"]))
                text = FOLLOW_UP.format(pre_ans=pre, input=turn["input"]) if self.golden_context else turn["input"]
                prompts.append("\n\n" + text)  # after the model's own answer
        return Sample(id=f"{subset}-{row.get('id', index)}", prompt=first,
                      references=[a for t in turns for a in as_list(t["answer"])],
                      max_new_tokens=self.max_new_tokens[subset], subtask=subset, meta={"row": index},
                      turns=[Turn(p, as_list(t["answer"])) for p, t in zip(prompts, turns)],
                      plan_first_turn=self.plan_length == "first_turn")

    def score(self, sample, prediction):
        raise NotImplementedError("scbench scores each turn (score_turn)")

    def score_turn(self, sample, turn, prediction):
        references = sample.turns[turn].references
        if METRICS[sample.subtask] == "string_match_all":
            return 100.0 * string_match_all(prediction, references)
        return 100.0 * kv_retrieval(prediction, references[0])

    def aggregate(self, records):
        return mean_over_turns(records)

    def protocol(self):
        out = {"task": self.name, "subsets": self.subsets, "max_turns": self.max_turns,
               "golden_context": self.golden_context, "templates": {s: FIRST_TURN[s] for s in self.subsets},
               "follow_up": FOLLOW_UP, "max_new_tokens": self.max_new_tokens,
               "metrics": {s: METRICS[s] for s in self.subsets}}
        # the official-run options, only when set (earlier results keep their protocol hash)
        for key, value, neutral in (("turn_format", self.turn_format, "raw"),
                                    ("plan_length", self.plan_length, "conversation"),
                                    ("last_answer_token", "fed" if self.feed_last_answer_token else "dropped", "fed")):
            if value != neutral:
                out[key] = value
        return out


def choice(cfg, key: str, valid: tuple[str, ...]) -> str:
    value = cfg.get(key) or valid[0]
    if value not in valid:
        raise ValueError(f"task.{key}={value!r} is not valid; use {' or '.join(valid)}")
    return value


CONTEXT_MARK = "\x00context\x00"


def chat_turns(tokenizer, subset: str, context: str, turns: list[dict], golden_context: bool):
    """The turns as SCBench's ``create_multiturn_prompt`` renders them with ``use_chat_template=True``: the first
    turn is the subset's template in one user message, with the generation prompt; a later one is the chat of
    ``[system "", assistant <previous gold answer>, user <input>]`` (``[user <input>]`` without the golden context)
    with the rendering of ``[system ""]`` (and its generation prompt with the golden context) cut off, so it
    continues the history.  Returns (the first turn's text up to the end of the context, every turn's text after
    it): the runner truncates the context alone."""
    def render(messages, generation_prompt):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template's own refusal (e.g. roles that must alternate)
            raise ValueError(f"task.turn_format=chat_template: the tokenizer's chat template cannot render SCBench's "
                             f"turns ({err}); the official runs use Llama-3.1's; use task.turn_format=raw") from None

    whole = render([{"role": "user", "content": FIRST_TURN[subset].format(context=CONTEXT_MARK,
                                                                          input=turns[0]["input"])}], True)
    head, _, tail = whole.partition(CONTEXT_MARK)
    system = render([{"role": "system", "content": ""}], golden_context)
    prompts = [tail]
    for previous, turn in zip(turns, turns[1:]):
        history = [{"role": "system", "content": ""},
                   {"role": "assistant", "content": str(previous["answer"])}] if golden_context else []
        text = render(history + [{"role": "user", "content": turn["input"]}], True)
        prompts.append(text.replace(system, ""))
    return head + context, prompts
