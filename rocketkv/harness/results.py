"""The results tree: one folder per configuration, predictions appended as samples finish, resumable.

``results/runs/<task>/<model>/<method>/<budget|none>/<config_hash>/`` holds ``config.yaml``,
``predictions.jsonl`` (one JSON line per finished sample), ``metrics.json`` and ``env.json``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


def run_dir(root: str | Path, task: str, model: str, method: str, budget: int | None, config_hash: str) -> Path:
    return Path(root) / "runs" / task / model / method / ("none" if budget is None else str(budget)) / config_hash


def check_output_dir(root: str | Path) -> None:
    """Fail before any model loads when results cannot be written under ``output_dir``."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as err:
        why = (err.strerror or str(err)).lower()
        raise ValueError(f"output_dir={str(root)!r} is not writable ({why}: {err.filename}); give "
                         "output_dir=<a folder you can write>") from None


class PredictionLog:
    """Append-only ``predictions.jsonl``.

    Reading never changes the file: a malformed line in the middle (a hand edit, a disk hiccup) is skipped with a
    warning and every valid row is kept; a row without an ``id`` stops the run with its path and line.  With
    ``repair`` (only under the cell's lock) a torn last line, a write cut off by a killed run, is cut away so the
    next append starts on a line of its own."""

    def __init__(self, path: Path, repair: bool = False):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            self._load(repair)

    def _load(self, repair: bool) -> None:
        raw = self.path.read_bytes()
        lines = raw.splitlines(keepends=True)
        torn = bool(lines) and not lines[-1].endswith(b"\n")
        for number, line in enumerate(lines[:-1] if torn else lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("%s: line %d is not valid JSON; skipped (the other rows are kept)", self.path, number)
                continue
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError(f"{self.path}: line {number} is not a prediction row (a JSON object with an 'id' "
                                 "field, one per finished sample); fix or delete that line")
            self.records.setdefault(str(rec["id"]), rec)
        if torn and repair:
            log.warning("%s: dropping a torn last line (a write cut off by a killed run)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(len(raw) - len(lines[-1]))

    def done(self) -> set[str]:
        return set(self.records)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["id"]] = record


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    try:
        version = metadata.version("rocketkv")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+{sha}" if sha else version


def environment(device: str) -> dict:
    packages = {}
    for name in ("torch", "transformers", "hydra-core", "datasets", "triton", "lm_eval", "gguf"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import torch

    return {"code_version": code_version(), "python": sys.version.split()[0], "platform": platform.platform(),
            "device": device, "packages": packages, "cpu_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
