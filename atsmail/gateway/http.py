"""Serving the API (and the review pages) inside the gateway's own event loop.

uvicorn runs the application on a socket bound here, so that port 0 works in
tests and a port already taken is a clear error at start. Its signal handling
is left out: the gateway's own SIGTERM handling stops everything in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn

from atsmail.config import Config
from atsmail.gateway.api import BodyLimit, create_app
from atsmail.storage import Store

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.app = create_app(config, store)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        settings = self.config.api
        try:
            sock = socket.create_server((settings.listen_host, settings.listen_port),
                                        family=_family(settings.listen_host), reuse_port=False)
        except OSError as exc:
            raise OSError(f"the API cannot listen on {settings.listen_host}:"
                          f"{settings.listen_port}: {exc.strerror or exc}") from None
        self.port = int(sock.getsockname()[1])
        self._server = _Server(uvicorn.Config(
            BodyLimit(self.app, settings.max_body), log_config=None, access_log=False,
            lifespan="off", server_header=False, timeout_graceful_shutdown=5,
            # Browsers and scripts reach the API on this machine only unless the
            # admin listens elsewhere; no proxy headers are trusted.
            proxy_headers=False))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise OSError("the API stopped while starting")
            await asyncio.sleep(0.01)
        log.info("API listening on %s:%d", settings.listen_host, self.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = self._task = None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
