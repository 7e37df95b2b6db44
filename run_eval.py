"""Entry point: ``python run_eval.py method=rocketkv budget=256 task=longbench`` (Hydra overrides)."""
from rocketkv.harness.cli import main

if __name__ == "__main__":
    main()
