"""SQuAD 2.0 and HotpotQA for RULER's qa_1 / qa_2, read into RULER's shape: a sorted list of unique documents and
questions pointing at their gold documents.

Sources, in order: ``task.qa_dir`` (official files: ``dev-v2.0.json``; ``hotpotqa_dev.json`` or
``hotpot_dev_distractor_v1.json``), else the Hugging Face hub through ``datasets`` when it is reachable (or when
``HF_HUB_OFFLINE=1`` and the sets are in the local ``datasets`` cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCAL_FILES = {"squad": ("dev-v2.0.json",), "hotpotqa": ("hotpotqa_dev.json", "hotpot_dev_distractor_v1.json")}
HUB_SETS = {"squad": ("rajpurkar/squad_v2", None, "validation"),
            "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation")}


@dataclass
class QuestionSet:
    name: str
    docs: list[str]
    questions: list[dict[str, Any]]  # query, answers, gold (doc indices), related (same-article doc indices)
    origin: str  # file path or hub id
    fingerprint: str  # content hash, part of the cache key


def squad_questions(data: dict) -> tuple[list[str], list[dict]]:
    """RULER's ``read_squad``: answerable questions; other paragraphs of the same article are preferred fillers."""
    docs = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
    doc_index = {doc: i for i, doc in enumerate(docs)}
    questions = []
    for article in data["data"]:
        article_docs = [doc_index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = doc_index[paragraph["context"]]
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                if qa.get("is_impossible") or not answers:
                    continue
                questions.append({"query": qa["question"], "answers": answers, "gold": [gold],
                                  "related": [i for i in article_docs if i != gold]})
    return docs, questions


def hotpot_doc(title: str, sentences: list[str]) -> str:
    return f"{title}\n{''.join(sentences)}"


def hotpot_questions(data: list[dict]) -> tuple[list[str], list[dict]]:
    """RULER's ``read_hotpotqa``: all ten paragraphs of an item (gold and distractors) go in its prompt."""
    docs = sorted({hotpot_doc(t, s) for item in data for t, s in item["context"]})
    doc_index = {doc: i for i, doc in enumerate(docs)}
    questions = [{"query": item["question"], "answers": [item["answer"]],
                  "gold": list(dict.fromkeys(doc_index[hotpot_doc(t, s)] for t, s in item["context"])),
                  "related": []} for item in data]
    return docs, questions


READERS = {"squad": squad_questions, "hotpotqa": hotpot_questions}


def from_file(name: str, path: Path) -> QuestionSet:
    raw = path.read_bytes()
    try:
        docs, questions = READERS[name](json.loads(raw))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not in the official {name} format: {err!r}") from err
    return QuestionSet(name, docs, questions, str(path), hashlib.sha256(raw).hexdigest()[:16])


def squad_from_rows(rows) -> dict:
    articles: dict[str, dict[str, list]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], {})
        answers = [{"text": t} for t in row["answers"]["text"]]
        paragraphs.setdefault(row["context"], []).append(
            {"question": row["question"], "answers": answers, "is_impossible": not answers})
    return {"data": [{"title": title, "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}
                     for title, paragraphs in articles.items()]}


def hotpot_from_rows(rows) -> list[dict]:
    return [{"question": row["question"], "answer": row["answer"],
             "context": [list(pair) for pair in zip(row["context"]["title"], row["context"]["sentences"])]}
            for row in rows]


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return True  # the datasets cache may hold the sets; load_dataset will not try the network
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hub(name: str) -> QuestionSet:
    import datasets

    repo, config, split = HUB_SETS[name]
    rows = datasets.load_dataset(repo, config, split=split)
    data = squad_from_rows(rows) if name == "squad" else hotpot_from_rows(rows)
    docs, questions = READERS[name](data)
    origin = f"hf://{repo}" + (f"/{config}" if config else "") + f"[{split}]"
    return QuestionSet(name, docs, questions, origin, getattr(rows, "_fingerprint", "")[:16] or origin)


def find_local(name: str, qa_dir: str | os.PathLike | None) -> Path | None:
    if not qa_dir:
        return None
    for filename in LOCAL_FILES[name]:
        path = Path(qa_dir).expanduser() / filename
        if path.is_file():
            return path
    return None


def load_question_set(name: str, qa_dir: str | None, use_hub: bool) -> QuestionSet | None:
    """The question set, or None when no source has it (the caller warns or raises)."""
    path = find_local(name, qa_dir)
    if path is not None:
        return from_file(name, path)
    if use_hub and hub_reachable():
        try:
            return from_hub(name)
        except Exception as err:  # noqa: BLE001 - any hub/datasets failure means "not available"
            log.warning("loading %s from the hub failed: %s", name, err)
    return None
