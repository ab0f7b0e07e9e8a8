"""The errors a user of the library meets for bad input. Each message names the problem and the valid choices."""


class CapeError(ValueError):
    """Base of the project's user-facing errors: the CLI prints them without a traceback and exits 2."""


class DatasetError(CapeError):
    """A problem with the dataset or a choice made against it.

    For example ``category 40 has 15 train images: index must be 0..14``.
    """


class CheckpointError(CapeError):
    """A checkpoint or weights file that is missing or does not fit the run."""
