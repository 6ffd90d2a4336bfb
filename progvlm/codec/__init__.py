"""The codec: the bitstream, entropy coding and the coding tables (torch-free)."""
