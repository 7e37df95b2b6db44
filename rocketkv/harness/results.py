"""The results tree: one folder per configuration, predictions appended as samples finish, resumable.

``results/runs/<task>/<model>/<method>/<budget|none>/<config_hash>/`` holds ``config.yaml``,
``predictions.jsonl`` (one JSON line per finished sample), ``metrics.json`` and ``env.json``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_dir(root: str | Path, task: str, model: str, method: str, budget: int | None, config_hash: str) -> Path:
    return Path(root) / "runs" / task / model / method / ("none" if budget is None else str(budget)) / config_hash


class PredictionLog:
    """Append-only ``predictions.jsonl``; a truncated last line (a killed run) is dropped on open."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        pos = 0
        for line in raw.splitlines(keepends=True):
            pos += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            self.records.setdefault(rec["id"], rec)
            good_end = pos
        if good_end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

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
    return {"code_version": code_version(), "python": sys.version.split()[0], "platform": platform.platform(),
            "device": device, "packages": packages}
