"""``rocketkv-lm-eval``: lm-eval's command line with the ``rocketkv`` model registered.

    rocketkv-lm-eval --model rocketkv --model_args pretrained=<path or hub id>,method=rocketkv,budget=256 --tasks <task>

Every lm-eval option works unchanged; the plain ``lm_eval`` command does not import this package, so it does not
know ``--model rocketkv``.
"""
from __future__ import annotations

import logging


def _share_lm_eval_logging() -> None:
    """Show our per-run statistics summary with lm-eval's own log lines (same handler and level)."""
    from lm_eval.utils import setup_logging

    setup_logging()
    source, ours = logging.getLogger("lm_eval"), logging.getLogger("rocketkv")
    ours.setLevel(source.level)
    for handler in source.handlers:
        ours.addHandler(handler)
    ours.propagate = False


def main() -> None:
    import rocketkv.harness.lm_eval_model  # noqa: F401  (registers --model rocketkv)
    from lm_eval.__main__ import cli_evaluate

    _share_lm_eval_logging()
    cli_evaluate()


if __name__ == "__main__":
    main()
