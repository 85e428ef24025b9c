"""A checkpoint that cannot be read is named in one sentence, whatever the strategy."""

from __future__ import annotations

import pickle
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

#: What ``torch.load`` raises for an empty (EOFError), text (UnpicklingError, KeyError) or
#: truncated (RuntimeError, OSError) file; a missing file keeps its own clear error.
_UNREADABLE = (RuntimeError, EOFError, KeyError, OSError, pickle.UnpicklingError)
_OWN_MESSAGE = (FileNotFoundError, IsADirectoryError, PermissionError)


def unreadable_checkpoint(path: Any, error: BaseException) -> RuntimeError:
    return RuntimeError(
        f"Cannot read the checkpoint {path}: it is empty, truncated, corrupted or not a "
        f"checkpoint file ({type(error).__name__}: {error})."
    )


class NamedErrorsCheckpointIO(CheckpointIO):
    """Wraps a Strategy's ``CheckpointIO``; only loading errors change (to one sentence).

    Args:
        inner: the strategy's checkpoint IO, which does all the work.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None):  # type: ignore[override]
        return self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return self.inner.load_checkpoint(path, *args, **kwargs)
        except _OWN_MESSAGE:
            raise
        except _UNREADABLE as error:
            raise unreadable_checkpoint(path, error) from error

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()
