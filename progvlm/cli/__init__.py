"""The command line (python -m progvlm): main.py assembles the parser; one module per command
group (training, evaluation, tools, serve, bench); options.py holds what they share."""
from .main import main

__all__ = ["main"]
