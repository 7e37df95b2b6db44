"""Hydra entry point shared by ``run_eval.py`` and the ``rocketkv-eval`` console script."""
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from rocketkv.runner import run

    run(cfg)
