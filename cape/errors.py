"""The errors a user of the library meets for bad input. Each message names the problem and the valid choices."""

from __future__ import annotations


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
