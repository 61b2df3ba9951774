"""Retraining: the Ray Train loop, training manifests, synthetic data, published model artifacts,
the `ramplus data` CLI and the evaluation report.
"""
