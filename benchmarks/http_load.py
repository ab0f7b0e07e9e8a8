"""A lean closed-loop HTTP/1.1 load generator: keep-alive connections, each sending its next GET as soon as the
previous answer is complete, with every answer's latency and status recorded.

Why not httpx: on a machine where the client shares the cores with the server, the client's CPU is taken from the
server. httpx spends many times more CPU per request than this (httptools parses the answers, uvloop runs the
sockets), so the figures measure the server, not the load generator. The benchmarks print the client's CPU per
request beside the server's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import uvloop


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx and non-2xx alike
    non_2xx: int = 0
    errors: int = 0  # no complete answer: reset, refused, time-out


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[int] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("the server closed the connection"))

    # httptools callbacks: the body is not kept, only the status once the whole message is in
    def on_message_complete(self) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(self.parser.get_status_code())

    def _fail(self, exc: Exception) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)

    async def get(self, request: bytes, timeout: float) -> int:
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await asyncio.wait_for(self.answer, timeout)


def _request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n".encode()


async def _open(host: str, port: int) -> _Connection:
    _, connection = await asyncio.get_running_loop().create_connection(_Connection, host, port)
    return connection


async def _closed_loop(
    host: str, port: int, request: bytes, deadline: float, tally: Tally, timeout: float, connection: _Connection
) -> _Connection:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            status = await connection.get(request, timeout)
        except (TimeoutError, OSError, httptools.HttpParserError):
            tally.errors += 1
            connection.transport.close()
            connection = await _open(host, port)  # a broken connection is replaced, as a real client would
            continue
        tally.latencies.append(time.perf_counter() - started)
        if not 200 <= status < 300:
            tally.non_2xx += 1
    return connection


@dataclass
class LoadResult:
    tallies: dict[str, Tally]  # per path name
    seconds: float  # the measured run, to the last answer
    client_cpu: float  # CPU seconds this process spent in the measured run
    server_cpu: float  # the same for the server, as read by the caller's probe (NaN without one)


async def _run(
    base: str,
    paths: dict[str, str],
    connections: int,
    warm_up: float,
    seconds: float,
    timeout: float,
    server_cpu: Callable[[], float],
) -> LoadResult:
    url = urlsplit(base)
    host, port = url.hostname, url.port or 80
    names = [list(paths)[i % len(paths)] for i in range(connections)]  # the connections alternate between paths
    requests = {name: _request(url.netloc, path) for name, path in paths.items()}
    conns = [await _open(host, port) for _ in range(connections)]  # all open before any clock starts

    async def phase(duration: float) -> tuple[dict[str, Tally], float]:
        tallies = {name: Tally() for name in paths}
        started = time.perf_counter()
        deadline = started + duration
        conns[:] = await asyncio.gather(
            *(
                _closed_loop(host, port, requests[name], deadline, tallies[name], timeout, conn)
                for conn, name in zip(conns, names)
            )
        )
        return tallies, time.perf_counter() - started  # the last answers come in a little after the deadline

    try:
        await phase(warm_up)  # the server's pools, caches and connections warm up unmeasured
        client_before, server_before = time.process_time(), server_cpu()
        tallies, elapsed = await phase(seconds)
        return LoadResult(tallies, elapsed, time.process_time() - client_before, server_cpu() - server_before)
    finally:
        for conn in conns:
            conn.transport.close()


def closed_loop_load(
    base: str,
    paths: dict[str, str],
    connections: int,
    seconds: float,
    warm_up: float = 1.0,
    timeout: float = 10.0,
    server_cpu: Callable[[], float] = lambda: float("nan"),
) -> LoadResult:
    """``connections`` keep-alive connections, given to ``paths`` in turn, each in a closed loop for ``seconds``
    after an unmeasured ``warm_up``. ``server_cpu`` reads the server's CPU seconds so far."""
    return uvloop.run(_run(base, paths, connections, warm_up, seconds, timeout, server_cpu))
