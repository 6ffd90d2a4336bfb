"""The codec's model: the MAE (mae.py), its quantisers (quantisers.py) and the transformer
layers it shares with the bundled VLM (layers.py). Nothing here imports the toy world."""
