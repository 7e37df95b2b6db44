"""``python -m rocketkv.lm_eval_cli``: the same command as ``rocketkv-lm-eval`` (``rocketkv.harness.lm_eval_cli``)."""
from rocketkv.harness.lm_eval_cli import main

if __name__ == "__main__":
    main()
