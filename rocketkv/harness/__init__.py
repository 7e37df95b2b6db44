"""The evaluation harness around the core: CLI, cells, runner, shared prefill, generation, models, results,
lm-eval bridge and report."""
