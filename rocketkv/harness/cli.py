"""Hydra entry point shared by ``run_eval.py`` and the ``rocketkv-eval`` console script.

A bad option ends the run with one line, ``error: <message>``, and exit code 2; ``ROCKETKV_DEBUG=1`` (or Hydra's
own ``HYDRA_FULL_ERROR=1``) shows the traceback instead.  Errors that are not about the input (a bug, a device
failure) keep their traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from rocketkv.harness.errors import CellBusy
from rocketkv.harness.options import RunOptions

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
PATH_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError)  # a path the user gave cannot be used
INPUT_ERRORS = (ValueError, FileNotFoundError, ModuleNotFoundError, HydraException, OmegaConfBaseException, CellBusy,
                *PATH_ERRORS)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _run(cfg: DictConfig) -> None:
    # reported inside the job too, where Hydra would first print its own "Error executing job" line
    with _reported(_debug if _debug is not None else _debug_requested()):
        RunOptions.from_cfg(cfg)  # the run's own options, checked before torch and transformers are imported
        from rocketkv.harness.runner import run

        run(cfg)


_debug: bool | None = None  # what the user asked for, read before ``main`` sets HYDRA_FULL_ERROR


def main() -> None:
    global _debug
    _debug = _debug_requested()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its config errors instead of printing them
    with _reported(_debug):
        _run()


def _debug_requested() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("ROCKETKV_DEBUG", "HYDRA_FULL_ERROR"))


@contextlib.contextmanager
def _reported(debug: bool):
    try:
        yield
    except INPUT_ERRORS as err:
        if debug:
            raise
        print(f"error: {describe(err, sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)


def describe(err: BaseException, argv: list[str]) -> str:
    """One line for a bad input: what was wrong and what would be valid."""
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"unknown {group} {name!r}; valid: {', '.join(err.options)}"
    if isinstance(err, PATH_ERRORS) and err.filename:
        why = (err.strerror or type(err).__name__).lower()
        return f"{why}: {err.filename}; give paths you can use (results go to output_dir=<a folder you can write>)"
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(err, HydraException) and key and "not in struct" in str(cause):
        parent, _, leaf = key.rpartition(".")
        valid = _keys_under(parent, argv)
        where = f"under {parent!r}" if parent else "at the top level"
        return (f"unknown option {key!r}; valid options {where}: {', '.join(valid)}" if valid
                else f"unknown option {key!r}")
    text = str(err)
    if isinstance(err, HydraException):
        text = text.split("\nSee https://hydra.cc", 1)[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _keys_under(parent: str, argv: list[str]) -> list[str]:
    """The keys of config node ``parent`` with the config groups chosen on the command line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    groups = [a for a in argv if "=" in a and Path(CONF_DIR, a.split("=", 1)[0].lstrip("+")).is_dir()]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            node = compose("config", overrides=[g for g in groups if "," not in g])
    except (HydraException, OmegaConfBaseException):
        return []
    for part in filter(None, parent.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(node.keys()) if isinstance(node, DictConfig) else []
