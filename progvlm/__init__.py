"""progvlm: progressive semantic communication for edge–cloud vision–language models.

The library behind the demo (no Gradio in here). Entry points: `python -m progvlm --help`.
"""
from pathlib import Path

__version__ = "0.1.0"
# the checkout's root and its bundled assets (weights, example scenes): one definition
ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
