"""RULER (Hsieh et al., 2024): synthetic long-context tasks generated at a target length for the model's tokenizer."""
