"""How quantized numbers are stored: weight types, packing, the uniform quantizer, BCQ, SpQR's format,
the E8P codebook, Hadamard matrices, incoherence processing, non-uniform (NUQ) grids."""
