"""The oracle: a readable, dtype-generic NumPy Transformer. It imports only numpy."""
