"""Loading LongBench rows through ``datasets``: official jsonl files in a folder, or a parquet mirror on the hub.

Rows keep the official fields ``input, context, answers, length, dataset, language, all_classes, _id``; every row
is checked so a malformed file fails with its name, row number and field instead of deep inside a run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

ROW_FIELDS: dict[str, str] = {
    "input": "a string",
    "context": "a string",
    "answers": "a non-empty list of strings",
    "length": "an integer",
    "dataset": "a string",
    "language": "a string",
    "all_classes": "null or a list of strings",
    "_id": "a string",
}


class MalformedRowError(ValueError):
    pass


@dataclass(frozen=True)
class DataSource:
    """Where rows come from: ``data_dir`` when set, else ``hub_repo`` at ``hub_revision``."""

    data_dir: str | None
    hub_repo: str
    hub_revision: str | None
    hub_split: str = "test"
    cache_dir: str | None = None


def file_stem(subset: str, variant: str) -> str:
    return f"{subset}_e" if variant == "e" else subset


def subset_file(data_dir: str | Path, subset: str, variant: str) -> Path:
    return Path(data_dir) / f"{file_stem(subset, variant)}.jsonl"


def subsets_in_dir(data_dir: str | Path, variant: str) -> list[str]:
    names = sorted(p.stem for p in Path(data_dir).glob("*.jsonl"))
    if variant == "e":
        return [n[: -len("_e")] for n in names if n.endswith("_e")]
    return [n for n in names if not n.endswith("_e")]


def check_data_dir(data_dir: str | Path, subsets: Iterable[str], variant: str) -> dict[str, Path]:
    """The jsonl file of each subset; a clear error when the folder or a file is missing."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"task.data_dir={data_dir}: no such folder; point it at a folder of LongBench jsonl "
                                f"files (<subset>.jsonl, or <subset>_e.jsonl for task.variant=e)")
    files = {}
    for subset in subsets:
        path = subset_file(folder, subset, variant)
        if not path.is_file():
            found = subsets_in_dir(folder, variant)
            raise FileNotFoundError(f"{path} is missing (subset {subset!r}, task.variant={variant}); subsets found in "
                                    f"{folder}: {found or 'none'}")
        files[subset] = path
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _field_ok(field: str, value: Any) -> bool:
    if field == "answers":
        return _is_str_list(value) and len(value) > 0
    if field == "length":
        return isinstance(value, int) and not isinstance(value, bool)
    if field == "all_classes":
        return value is None or _is_str_list(value)
    return isinstance(value, str)


def check_row(row: Any, where: str, row_number: int, needs_classes: bool = False) -> dict:
    if not isinstance(row, dict):
        raise MalformedRowError(f"{where}, row {row_number}: expected a JSON object, got {type(row).__name__}")
    for field, expected in ROW_FIELDS.items():
        if field not in row:
            raise MalformedRowError(f"{where}, row {row_number}: field {field!r} is missing")
        if row[field] is None and field != "all_classes":
            raise MalformedRowError(f"{where}, row {row_number}: field {field!r} is missing or null")
        if not _field_ok(field, row[field]):
            raise MalformedRowError(f"{where}, row {row_number}: field {field!r} must be {expected}, "
                                    f"got {row[field]!r:.80}")
    if needs_classes and not row["all_classes"]:
        raise MalformedRowError(f"{where}, row {row_number}: field 'all_classes' must list the class names "
                                f"(this subset is scored by classification)")
    return {field: row[field] for field in ROW_FIELDS}


def _check_unique_ids(rows: list[dict], where: str) -> None:
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if row["_id"] in seen:
            raise MalformedRowError(f"{where}, row {number}: _id {row['_id']!r} repeats row {seen[row['_id']]}; "
                                    f"sample ids must be unique")
        seen[row["_id"]] = number


def check_jsonl_file(path: Path, needs_classes: bool = False) -> None:
    """Check every raw line: the Arrow JSON reader behind ``datasets`` silently casts some wrong types (a string
    "12" in an integer column) and fills absent keys with null, so its rows cannot name the faulty one."""
    with open(path, encoding="utf-8") as f:
        number = 0
        for line in f:
            if not line.strip():
                continue
            number += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MalformedRowError(f"{path}, row {number}: not valid JSON ({err})") from None
            check_row(row, str(path), number, needs_classes)


def load_jsonl_rows(path: Path, needs_classes: bool = False, cache_dir: str | None = None) -> list[dict]:
    import datasets

    check_jsonl_file(path, needs_classes)
    try:
        table = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as err:
        raise MalformedRowError(f"{path}: datasets could not read it as JSON lines: {err}") from err
    rows = [check_row(row, str(path), number, needs_classes) for number, row in enumerate(table.to_list(), start=1)]
    _check_unique_ids(rows, str(path))
    return rows


OFFLINE_DATA_DOC = "docs/tasks.md, LongBench: 'Data on an offline cluster'"  # where the error sends the user


def load_hub_rows(source: DataSource, subset: str, variant: str, needs_classes: bool = False) -> list[dict]:
    import datasets

    config = file_stem(subset, variant)
    try:
        table = datasets.load_dataset(source.hub_repo, config, split=source.hub_split, revision=source.hub_revision,
                                      cache_dir=source.cache_dir)
    except Exception as err:
        raise ValueError(
            f"LongBench data is not available: loading {source.hub_repo!r} config {config!r} (revision "
            f"{source.hub_revision or 'latest'}) from the Hugging Face hub failed ({type(err).__name__}: {err}). "
            f"Either make the hub reachable (task.hub_repo / task.hub_revision choose the parquet mirror), or set "
            f"task.data_dir=<folder with the official {config}.jsonl files> ({OFFLINE_DATA_DOC})"
        ) from err
    where = f"{source.hub_repo}@{source.hub_revision or 'latest'}/{config}"
    rows = [check_row(row, where, number, needs_classes) for number, row in enumerate(table.to_list(), start=1)]
    _check_unique_ids(rows, where)
    return rows
