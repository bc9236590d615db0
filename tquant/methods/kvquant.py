"""KVQuant (Hooper et al., 2024): under construction."""
