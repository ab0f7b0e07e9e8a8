"""The errors a user of the library meets for bad input. Each message names the problem and the valid choices."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CapeError(ValueError):
    """Base of the project's user-facing errors: the CLI prints them without a traceback and exits 2."""


class DatasetError(CapeError):
    """A problem with the dataset or a choice made against it.

    For example ``category 40 has 15 train images: index must be 0..14``. ``field`` names the TrainConfig field the
    choice came from (``category_id``, ``image_index``, ...), so that the API can point its 422 at that field; None
    when the dataset itself is at fault (a missing file, a malformed annotation).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CheckpointError(CapeError):
    """A checkpoint or weights file that is missing or does not fit the run."""


class TrainingDiverged(CapeError):
    """The loss or the gradients stopped being finite: the run cannot go on, and its last good checkpoint is kept."""


class OutOfMemory(CapeError):
    """The device ran out of memory: the run cannot go on at this size. The message names the batch, the AMP setting
    and what to change; the last checkpoint is kept."""


class DiskFull(CapeError):
    """A file of the run could not be written: its disk (or the user's quota) is full, or the file outgrew the
    process's file-size limit. The message says which file, how much room is left there and what to do."""

    REASONS = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "the file outgrew this process's file-size limit (ulimit -f)",
    }

    @classmethod
    def at(cls, path: Path, error: OSError) -> DiskFull:
        folder = path.parent
        usage = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists()))
        return cls(
            f"{cls.REASONS[error.errno]}: cannot write {path.name} in {folder} ({error.strerror}; "
            f"{_mib(usage.free)} free of {_mib(usage.total)} there). Free space on that disk, or give the run another "
            "folder, then resume it from its last checkpoint"
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Writes to ``path`` inside: an error that means no room (see DiskFull) becomes DiskFull."""
    try:
        yield
    except Exception as exc:
        no_room = _no_room(exc)
        if no_room is None:
            raise
        raise DiskFull.at(path, no_room) from exc


def _no_room(exc: BaseException | None) -> OSError | None:
    # Also behind another error: torch.save's writer, failing to close its archive after the OSError, raises a
    # RuntimeError of its own, with the OSError as its context.
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DiskFull.REASONS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
