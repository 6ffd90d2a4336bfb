"""The device-side process: the VLM's edge half and the MAE encoder, timed stage by stage."""
