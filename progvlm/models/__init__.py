"""Model definitions: the bundled tiny VLM (and, in later modules, the MAE)."""
