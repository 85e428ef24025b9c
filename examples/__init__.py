"""Example training scripts and data for lightning_grng."""
