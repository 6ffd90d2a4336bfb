"""The bench's settings: what it sweeps, asks and assumes (one definition each)."""

# ---- the paper-style experiment (bundled VLM) -------------------------------------------------
BANDWIDTHS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 50)
QUICK_BANDWIDTHS = (0.1, 1, 10)
JPEG_QUALITIES = (5, 10, 20, 30, 50, 70, 90, 95)
QUICK_JPEG_QUALITIES = (10, 50, 90)
CONCURRENCY = (1, 4, 16)
CONSISTENCY_TARGET = 0.97
AUTO_BUDGET_MS = 150.0
ADAPTIVE_BUDGET_MS = 500.0  # adaptive's: the agent's default budget
CONVERSATION_TURNS = 5
HEADLINE_MBPS, HEADLINE_RTT_MS = 1.0, 20.0

# ---- any VLM: the cost profile (timing and bytes, no ground truth) -----------------------------
COST_QUESTION = "Describe the image."
ANSWER_TOKENS = 16  # generated tokens per answer in the end-to-end model (an assumption)
COST_RTT_MS = 20.0
COST_BANDWIDTHS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100)
COST_JPEG_QUALITY = 90  # full-cloud's JPEG, as the agent sends it
CROSSOVER_RANGE_MBPS = (0.01, 10_000.0)
CHEAP_STAGE_REPEATS = 7  # stages of a few ms (MAE, JPEG): the best of this many runs
