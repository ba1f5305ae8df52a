"""Run a :class:`~gamguard.runtime.server.app.GuardServer` in a background thread's event loop,
driven from ordinary synchronous code (benchmarks, notebooks, tests)::

    from gamguard.runtime.server.background import BackgroundServer
    from gamguard.runtime.server.config import ServeConfig

    with BackgroundServer(ServeConfig(insecure=True, port=0)) as srv:   # embedded demo bundle
        print(srv.target)            # "127.0.0.1:PORT", SERVING once the with-block starts
        ...                          # any gRPC client (GuardClient, tritonclient.grpc, grpcurl)
"""

from __future__ import annotations

import asyncio
import threading


class BackgroundServer:
    def __init__(self, config, guard_factory=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="gamguard-server-loop")
        self.thread.start()

        async def make():
            from .app import GuardServer

            return GuardServer(config, guard_factory=guard_factory)

        self.server = self.call(make())

    def call(self, coro, timeout: float | None = 120):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait: bool = True, timeout: float = 120) -> "BackgroundServer":
        """Bind and start; with ``wait`` block until SERVING (raises RuntimeError if loading failed)."""
        self.call(self.server.start())
        if wait:
            self.call(self.server.wait_ready(timeout), timeout=timeout + 5)
        return self

    @property
    def target(self) -> str:
        return self.server.target

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop, then end the loop thread."""
        try:
            self.call(self.server.stop(grace), timeout=grace + 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
