"""Training loops: the bundled VLM (train_vlm) and, later, the MAE."""
