"""Embedded models: GGUF files shipped inside PyPI packages, checked by size and sha256, dequantised once and
cached as float32 safetensors (``ROCKETKV_CACHE`` moves the cache)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def package_file(package: str, filename: str, install: str | None) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (package {package!r} is incomplete); reinstall with: {install}")
    return path


def sha256_of(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    import platformdirs

    return Path(os.environ.get("ROCKETKV_CACHE", platformdirs.user_cache_dir("rocketkv")))


def load_gguf_package(spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = [package_file(pkg, fn, spec.install) for pkg, fn in spec.gguf_parts]
    size = sum(p.stat().st_size for p in parts)
    cache = cache_root() / "models" / f"{spec.name}-{(spec.gguf_sha256 or 'unverified')[:16]}"
    done = cache / "rocketkv_done.json"
    stamp = {"parts": [str(p) for p in parts], "size": size, "mtimes": [p.stat().st_mtime_ns for p in parts]}
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32), AutoTokenizer.from_pretrained(cache)

    if spec.gguf_size is not None and size != spec.gguf_size:
        raise ValueError(f"model {spec.name!r}: GGUF parts total {size} bytes, expected {spec.gguf_size}; "
                         f"the files are corrupt or incomplete; reinstall with: {spec.install}")
    if spec.gguf_sha256:
        digest = sha256_of(parts)
        if digest != spec.gguf_sha256:
            raise ValueError(f"model {spec.name!r}: GGUF sha256 {digest} != expected {spec.gguf_sha256}; refusing to "
                             f"load it; reinstall with: {spec.install}")
    cache.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1:
        gguf_dir, gguf_name = parts[0].parent, parts[0].name
    else:
        gguf_dir, gguf_name = cache, "model.gguf"
        with open(cache / gguf_name, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
    log.info("dequantising %s once; the float32 copy is cached in %s", gguf_name, cache)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # Saving a GGUF-loaded model keeps its quantisation marker, which save_pretrained refuses; the weights are
    # already dequantised float32, so drop the marker.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(cache)
    tok.save_pretrained(cache)
    if len(parts) > 1:
        (cache / gguf_name).unlink()
    done.write_text(json.dumps(stamp))
    return model, tok
