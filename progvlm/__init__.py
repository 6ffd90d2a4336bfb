"""progvlm: progressive semantic communication for edge–cloud vision–language models.

The library behind the demo (no Gradio in here). Entry points: `python -m progvlm --help`.
"""
__version__ = "0.1.0"
