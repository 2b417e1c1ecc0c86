"""The evaluator's parts: its configuration (EvalConfig), the probe inside an evaluation, the tables."""
