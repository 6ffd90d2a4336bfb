"""Training loops: the bundled VLM (train_vlm) and the MAE for any VLM (train_mae, with its
runs in mae_runs and its data in mae_data)."""
