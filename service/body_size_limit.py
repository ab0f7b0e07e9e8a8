"""A request body size limit, as pure ASGI middleware: a large or endless body is refused with 413 before any of
it is parsed, whether it declares its length or streams it. Paths matching a pattern of ``larger`` (uploads) get
that pattern's limit instead."""

from __future__ import annotations

import json
import re


class BodySizeLimit:
    def __init__(self, app, max_bytes: int, larger: dict[str, int] | None = None):
        self.app, self.default_max = app, max_bytes
        self.larger = [(re.compile(pattern), limit) for pattern, limit in (larger or {}).items()]

    def limit(self, path: str) -> int:
        return next((limit for pattern, limit in self.larger if pattern.match(path)), self.default_max)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.limit(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            return await self._too_large(send, max_bytes)

        received, rejected, responded = 0, False, False

        async def limited_receive():
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes and not rejected:
                    rejected = True
                    if not responded:
                        await self._too_large(send, max_bytes)
                    # To the application the client is gone: it stops reading and its answer goes nowhere.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal responded
            if rejected:
                return
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    @staticmethod
    async def _too_large(send, max_bytes: int):
        body = json.dumps({"detail": f"request body larger than {max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
