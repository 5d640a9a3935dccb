"""The event loop a worker serves grpc.aio on: uvloop (libuv) by default, the standard
library's asyncio loop on request (``qjscore serve --event-loop asyncio``).

grpc.aio runs on any asyncio loop. On this project's 2-core benchmark machine (three paired
rounds, medians) uvloop's cheaper scheduling of callbacks gave the service 8 % more unary
checks a second (batch checks the same), and the bare grpcio server 16 % more unary calls
and 24 % more batch checks. The load benchmark (loadtest/bench.py) runs the service and its
baseline on the same loop and reports which.
"""

from __future__ import annotations

import asyncio

EVENT_LOOPS = ("uvloop", "asyncio")


def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if kind == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(f"event loop {kind!r}: expected one of {', '.join(EVENT_LOOPS)}")
