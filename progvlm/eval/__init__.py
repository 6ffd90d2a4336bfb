"""Evaluation: the codec registry, the one ladder over it (scenes or any images), calibration, metrics, the layer map."""
