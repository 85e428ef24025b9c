"""Tools that observe the optimizers without changing them (host-sync counting)."""

from lightning_grng.diagnostics.syncs import SyncCounter, count_syncs

__all__ = ["SyncCounter", "count_syncs"]
