"""How a worker rides out an outage of what it writes to (the artifact store, the database): the one retry policy.

A call that fails because the other side cannot be reached for now (a restart, a dropped connection, a "slow down")
is tried again with exponential backoff, 0.5 s doubling to 10 s between tries, for a bounded time, its patience
(CAPE_STORE_RETRY_S, CAPE_DATABASE_RETRY_S): long enough for a restart, short enough that a dead dependency ends the
job with a clear message. Any other error (a refusal, a bug) is raised at once. Meanwhile the caller waits: a job's
training pauses until its epoch is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_WAIT_S, MAX_WAIT_S = 0.5, 10.0


class Unavailable(RuntimeError):
    """A dependency (the artifact store, the database) could not be reached: the message says which, and for a
    retried call, for how long and doing what. Written for the user: a job's error shows it as it is."""


class DatabaseUnavailable(Unavailable):
    pass


def database_down(exc: BaseException) -> bool:
    """Whether a database error means the server cannot be reached for now (restarting, connection dropped, pool
    exhausted), as opposed to a bug in the statement."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def persist(
    call: Callable[[], T],
    *,
    transient: Callable[[BaseException], bool],
    patience_s: float,
    setting: str,
    what: str,
    doing: str,
    unavailable: type[Unavailable],
) -> T:
    """``call()``, tried again while it raises a ``transient`` error, for up to ``patience_s`` seconds (the value of
    the CAPE_ ``setting``); then ``unavailable``, naming ``what`` could not be reached, ``doing`` what, how often and
    the last error. ``what``: "artifact store s3://bucket/prefix at http://host:port"; ``doing``: "pushing
    epochs/3/predictions.png of job X"."""
    started = time.monotonic()

    def waiting(state: RetryCallState) -> None:
        left = patience_s - (time.monotonic() - started)
        log.warning(
            "%s unreachable (%s): trying again in %.1f s, for up to %.0f s more: %s",
            what,
            doing,
            state.next_action.sleep,
            max(left, 0),
            _described(state.outcome.exception()),
        )

    retrying = Retrying(
        retry=retry_if_exception(transient),
        stop=stop_after_delay(patience_s),
        wait=wait_exponential(multiplier=FIRST_WAIT_S, max=MAX_WAIT_S),
        before_sleep=waiting,
    )
    try:
        return retrying(call)
    except RetryError as exc:
        tries = exc.last_attempt.attempt_number
        last = exc.last_attempt.exception()
        raise unavailable(
            f"{what} unreachable for {time.monotonic() - started:.0f} s ({setting}={patience_s:g}): {doing} failed "
            f"{tries} time{'s' if tries > 1 else ''}; last error: {_described(last)}"
        ) from last


def _described(exc: BaseException) -> str:
    # An Unavailable raised for one failed call (the store's) already names the dependency: its cause says the rest.
    if isinstance(exc, Unavailable) and exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"
