"""On-disk cache of generated RULER sample sets: one jsonl per (task, length, tokenizer, num_samples, seed,
generator version, source) plus ``manifest.json`` describing every file.

Generation is deterministic, so a set is reused by every later run with the same key -- across KV methods and
budgets.  A file whose content hash or line count disagrees with the manifest (corrupt, partial, edited) is
treated as missing and regenerated.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from evals.base import Sample, stable_hash

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token counts: class, vocabulary, chat template and a probe encoding."""
    vocab = sorted(tokenizer.get_vocab().items())
    probe = "RULER probe: The grass is green. 1234567 e5c3f0a2-uuid VAR ABCDE = 12345\n\tÜnïcødé …"
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps(tokenizer(probe, add_special_tokens=True).input_ids).encode())
    return h.hexdigest()[:16]


class SampleCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, key: dict[str, Any]) -> Path:
        return self.root / f"{key['task']}-{key['length']}-{stable_hash(key, 16)}.jsonl"

    def manifest(self) -> dict:
        try:
            data = json.loads((self.root / MANIFEST).read_text())
            return data if isinstance(data.get("files"), dict) else {"files": {}}
        except (OSError, ValueError, AttributeError):
            return {"files": {}}

    def load(self, key: dict[str, Any]) -> list[Sample] | None:
        """The cached samples for ``key``, or None when absent or not intact."""
        path = self.path_for(key)
        entry = self.manifest()["files"].get(path.name)
        if entry is None or not path.is_file():
            return None
        raw = path.read_bytes()
        if entry.get("sha256") != hashlib.sha256(raw).hexdigest() or entry.get("key") != key:
            log.warning("RULER cache file %s does not match its manifest entry; regenerating", path)
            return None
        try:
            samples = [Sample(**json.loads(line)) for line in raw.decode().splitlines() if line.strip()]
        except (ValueError, TypeError) as err:
            log.warning("RULER cache file %s is unreadable (%s); regenerating", path, err)
            return None
        if len(samples) != entry.get("count") or len(samples) != key["num_samples"]:
            log.warning("RULER cache file %s holds %d samples, expected %d; regenerating", path, len(samples),
                        key["num_samples"])
            return None
        return samples

    def store(self, key: dict[str, Any], samples: list[Sample]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        text = "".join(json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in samples)
        raw = text.encode()
        with FileLock(str(self.root / (MANIFEST + ".lock"))):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(raw)
            os.replace(tmp, path)
            manifest = self.manifest()
            manifest["files"][path.name] = {
                "key": key, "count": len(samples), "sha256": hashlib.sha256(raw).hexdigest(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "prompt_tokens": _span([s.meta.get("prompt_tokens") for s in samples]),
            }
            tmp_manifest = self.root / f"{MANIFEST}.tmp{os.getpid()}"
            tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.replace(tmp_manifest, self.root / MANIFEST)
        return path


def _span(values: list) -> dict | None:
    known = [v for v in values if isinstance(v, int)]
    return {"min": min(known), "max": max(known)} if known else None
