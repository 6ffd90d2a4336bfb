"""The benchmark: experiment.py (the paper-style run, bundled VLM), agent_runs.py (its requests
to the edge agent), load.py (the cloud under concurrent clients), cost.py (any VLM's cost
profile), report.py (CSV, plots, summaries), settings.py (what it sweeps and assumes)."""
