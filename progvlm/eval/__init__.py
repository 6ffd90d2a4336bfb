"""Evaluation: the eval loops, metrics, baselines, the layer map."""
