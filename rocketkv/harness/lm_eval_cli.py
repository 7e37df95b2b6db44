"""``rocketkv-lm-eval``: lm-eval's command line with the ``rocketkv`` model registered.

    rocketkv-lm-eval --model rocketkv --model_args pretrained=<path or hub id>,method=rocketkv,budget=256 --tasks <task>

Every lm-eval option works unchanged; the plain ``lm_eval`` command does not import this package, so it does not
know ``--model rocketkv``.  What the rocketkv model refuses (``BridgeError``: an unknown ``--model_args`` key,
``--batch_size`` other than 1, sampling ``--gen_kwargs``) is one ``error: ...`` line and exit code 2
(``ROCKETKV_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

HELP = """\
rocketkv: lm-eval with a compressed KV cache.  --model rocketkv --model_args pretrained=<path or hub id>,...:
  method=<name>       {methods}  (default: rocketkv)
  budget=<tokens>     the paper's token budget t (default: 256; full ignores it)
  <option>=<value>    method options, e.g. window=32, kernel_size=63, selection=group
  loglikelihood=error|dense   log-likelihood requests: refused (default) or scored with full attention
  model_max_len=<n>   the length cap of the budget plan (default: the model's max length)
  Greedy decoding, one request at a time: --batch_size other than 1 and sampling --gen_kwargs are refused.
"""


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
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        from rocketkv.core.methods import METHODS

        print(HELP.format(methods=", ".join(sorted(METHODS))))
    from rocketkv.harness.lm_eval_model import BridgeError, check_cli_args  # registers --model rocketkv
    from lm_eval.__main__ import cli_evaluate

    try:
        early = argparse.ArgumentParser(add_help=False)
        early.add_argument("--model")
        early.add_argument("--model_args")
        early.add_argument("--batch_size", "-b")
        known, _ = early.parse_known_args()
        if known.model == "rocketkv":  # a typo costs a second, not lm-eval's task indexing and a model load
            check_cli_args(known.model_args, known.batch_size)
        _share_lm_eval_logging()
        cli_evaluate()
    except BridgeError as err:
        if os.environ.get("ROCKETKV_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
