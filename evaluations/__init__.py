"""ADM-identical evaluation: numpy metric math (metrics.py) and feature backends (TF graph, torch, digits).

See docs/evaluation.md. Entry points: `evaluations.evaluator.evaluate`, `evaluations.metrics`,
`evaluations.make_reference.make_reference`, `evaluations.digits.digits_features`.
"""
