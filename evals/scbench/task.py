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

    def validate(self, model_max_len: int) -> None:
        if not self.data_dir:
            raise ValueError(f"task=scbench needs its data: {HOW_TO_GET}")
        if not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"task.data_dir={self.data_dir}: no such folder; {HOW_TO_GET}")
        for subset in self.subsets:
            subset_path(self.data_dir, subset)

    def samples(self, tokenizer, model_max_len):
        self.validate(model_max_len)
        out = []
        for subset in self.subsets:
            for index, row in enumerate(read_rows(subset_path(self.data_dir, subset))):
                out.append(self._sample(subset, index, row))
        return out

    def _sample(self, subset: str, index: int, row: dict) -> Sample:
        turns = row["multi_turns"][: self.max_turns]
        first, _, question = FIRST_TURN[subset].partition("{context}")
        prompts = [question.format(input=turns[0]["input"])]
        for previous, turn in zip(turns, turns[1:]):
            pre = ", ".join(as_list(previous["answer"]))
            text = FOLLOW_UP.format(pre_ans=pre, input=turn["input"]) if self.golden_context else turn["input"]
            prompts.append("\n\n" + text)  # after the model's own answer
        return Sample(id=f"{subset}-{row.get('id', index)}", prompt=first + row["context"],
                      references=[a for t in turns for a in as_list(t["answer"])],
                      max_new_tokens=self.max_new_tokens[subset], subtask=subset, meta={"row": index},
                      turns=[Turn(p, as_list(t["answer"])) for p, t in zip(prompts, turns)])

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
        return {"task": self.name, "subsets": self.subsets, "max_turns": self.max_turns,
                "golden_context": self.golden_context, "templates": {s: FIRST_TURN[s] for s in self.subsets},
                "follow_up": FOLLOW_UP, "max_new_tokens": self.max_new_tokens,
                "metrics": {s: METRICS[s] for s in self.subsets}}
