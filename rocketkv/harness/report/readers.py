"""Tolerant readers for the files of one run folder.

Every problem (missing file, bad JSON, truncated line, bad YAML) becomes a warning string rather than an
exception, so one broken run never stops a report over hundreds of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """Records of a JSON-lines file, skipping lines that do not parse to an object with an ``id``."""
    warnings: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return [], [f"{path}: unreadable ({err})"]
    lines = text.split("\n")
    # A file that ends with a newline splits into a trailing empty string; anything else there was cut off.
    last_is_partial = lines[-1] != ""
    records: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if last_is_partial and number == len(lines):
                warnings.append(f"{path}: truncated last line {number} skipped")
            else:
                warnings.append(f"{path}: malformed JSON on line {number} skipped")
            continue
        if not isinstance(record, dict) or "id" not in record:
            warnings.append(f"{path}: line {number} is not a prediction record (no 'id'), skipped")
            continue
        records.append(record)
    return records, warnings


def read_json(path: Path) -> tuple[dict | None, list[str]]:
    """A JSON object, or ``None`` with a warning when the file is missing, unreadable or not an object."""
    if not path.exists():
        return None, [f"{path}: missing"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, [f"{path}: unreadable ({err})"]
    if not isinstance(data, dict):
        return None, [f"{path}: not a JSON object"]
    return data, []


def read_yaml(path: Path) -> tuple[Any, list[str]]:
    """Parsed YAML, or ``None`` with a warning when the file is missing or does not parse."""
    if not path.exists():
        return None, [f"{path}: missing"]
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")), []
    except (OSError, yaml.YAMLError) as err:
        return None, [f"{path}: unreadable ({err.__class__.__name__})"]
