"""Side-by-side benchmarks of the GRNG optimizers (see benchmarks/README.md)."""
