"""QoQ KV4 with SmoothAttention (Lin et al., 2024, QServe): under construction."""
