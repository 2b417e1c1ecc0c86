"""Shared pieces of the trainer and the evaluator: model presets, typed configs, metrics."""
