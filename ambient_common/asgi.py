"""The one piece of ASGI every server of ours needs: answering the lifespan protocol."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]  # servers type their messages differently


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown; our apps keep no state that needs either."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
