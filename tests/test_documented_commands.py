"""Every command and import the docs show runs as written: read off README.md and docs/*.md.

- ``python -m <module>``: the module exists;
- ``rocketkv-*``: a console script of pyproject.toml whose target imports;
- ``import x`` / ``from x import y`` (Python blocks and inline code): they import;
- ``python run_eval.py <overrides>``: the overrides compose into the runner's config, as ``--cfg job`` would do
  (a multirun's sweep takes its first value; ``<placeholders>`` become a word).  A command shown with the
  ``error:`` line it prints is a documented failure, and must fail.
"""
import ast
import importlib
import importlib.util
import re
import shlex
import tomllib

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The method docs/adding-a-method.md builds step by step: its files do not exist in the repository.
TUTORIAL_ONLY = ("method=sinks",)


def code_blocks(text):
    """(language, body) of each fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def inline_spans(text):
    without_blocks = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", without_blocks)]


def shell_commands(body):
    """Commands of a shell block: continuations joined, comments and ``$ `` prompts dropped, ``&&`` split.
    A command followed by an ``error:`` line is returned with ``expect_error=True``."""
    lines = body.replace("\\\n", " ").splitlines()
    out = []
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        line = re.sub(r"\s+#.*$", "", line)
        expect_error = i + 1 < len(lines) and lines[i + 1].startswith("error:")
        out += [(part.strip(), expect_error) for part in line.split("&&") if part.strip()]
    return out


def documented():
    commands, imports = [], []
    for path in DOCS:
        text = path.read_text()
        for lang, body in code_blocks(text):
            if lang == "python":
                imports += [(path.name, stmt) for stmt in python_imports(body)]
            elif lang in ("", "bash"):
                commands += [(path.name, cmd, err) for cmd, err in shell_commands(body)]
        for span in inline_spans(text):
            if span.startswith(("import ", "from ")):
                imports += [(path.name, stmt) for stmt in python_imports(span)]
            elif span.startswith(("python ", "rocketkv-")):
                commands.append((path.name, span, False))
    return commands, imports


def python_imports(source):
    tree = ast.parse(source)
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


COMMANDS, IMPORTS = documented()
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_docs_show_the_commands_this_test_checks():
    shown = " | ".join(cmd for _, cmd, _ in COMMANDS)
    for fragment in ("python run_eval.py", "python -m rocketkv.lm_eval_cli", "rocketkv-lm-eval", "rocketkv-report"):
        assert fragment in shown
    assert any(isinstance(i, ast.Import) and i.names[0].name == "rocketkv.lm_eval_model" for _, i in IMPORTS)


@pytest.mark.parametrize("doc,stmt", IMPORTS, ids=[f"{d}:{ast.unparse(s)}" for d, s in IMPORTS])
def test_documented_imports_import(doc, stmt):
    if isinstance(stmt, ast.Import):
        for alias in stmt.names:
            importlib.import_module(alias.name)
        return
    module = importlib.import_module(stmt.module)
    for alias in stmt.names:
        assert hasattr(module, alias.name) or importlib.util.find_spec(f"{stmt.module}.{alias.name}"), \
            f"{doc}: from {stmt.module} import {alias.name}"


def modules_and_scripts():
    out = []
    for doc, cmd, _ in COMMANDS:
        words = cmd.split()
        if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m":
            out.append((doc, "module", words[2]))
        elif words[0].startswith("rocketkv-"):
            out.append((doc, "script", words[0]))
    return sorted(set(out))


@pytest.mark.parametrize("doc,kind,name", modules_and_scripts())
def test_documented_modules_and_console_scripts_exist(doc, kind, name):
    if kind == "module":
        assert importlib.util.find_spec(name) is not None, f"{doc}: python -m {name}"
        return
    assert name in SCRIPTS, f"{doc}: {name} is not a console script of pyproject.toml ({sorted(SCRIPTS)})"
    module, _, function = SCRIPTS[name].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def run_eval_commands():
    out = []
    for doc, cmd, expect_error in COMMANDS:
        start = cmd.find("python run_eval.py")
        if start < 0 or any(t in cmd for t in TUTORIAL_ONLY):
            continue
        out.append((doc, cmd[start:], expect_error))
    return out


def overrides_of(cmd):
    """The overrides ``--cfg job`` would compose: options and ``...`` dropped, a sweep's first value taken."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = [w for w in shlex.split(re.sub(r"<[^<>]+>", "x", cmd))[2:]
             if w not in ("-m", "--multirun", "--cfg", "job", "...")]
    parser = OverridesParser.create()
    out = []
    for word in words:
        override = parser.parse_override(word)
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            word = f"{override.get_key_element()}={first}"
        out.append(word)
    return out


@pytest.mark.parametrize("doc,cmd,expect_error", run_eval_commands(), ids=[c for _, c, _ in run_eval_commands()])
def test_documented_run_eval_overrides_compose(doc, cmd, expect_error):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rocketkv.harness.options import RunOptions

    overrides = overrides_of(cmd)
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        RunOptions.from_cfg(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        assert expect_error, f"{doc}: {cmd}\n{err}"
        return
    assert not expect_error, f"{doc}: {cmd} is shown failing but runs"
