"""Everything of the quantized KV cache: formats, dynamic and static caches, the decode-attention and write
kernels, and the hook that gives generate() a quantized cache."""
