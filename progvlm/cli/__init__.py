"""The command line (python -m progvlm): one module per command group."""
from .main import main

__all__ = ["main"]
