"""Long-context tasks: prompt construction, metrics and aggregation, independent of any KV method."""
