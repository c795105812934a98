"""The running gateway: the store, the capture writer, the relay, mirror, sender,
webhooks and HTTP API, and the daily purge of mail past its retention.

With `serve --workers N` the first process runs all of that and N-1 more
processes run only the relay: the relay's parsing and rules then use every
core. Each process accepts on its own socket bound to the relay's port with
SO_REUSEPORT, so the kernel spreads connections evenly (one shared socket
would let whichever process woke first take a whole burst); the first process
binds them all, after making sure no one else holds the port. It restarts a
worker that dies, and the workers stop when it stops, or when it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from atsmail.config import Config
from atsmail.gateway.credentials import Credentials
from atsmail.gateway.http import HttpServer
from atsmail.gateway.mirror import Mirror
from atsmail.gateway.relay import Relay
from atsmail.gateway.sender import Sender
from atsmail.gateway.webhooks import Webhooks, endpoints
from atsmail.storage import CaptureWriter, Store
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.retention import apply_retention

log = logging.getLogger(__name__)

T = TypeVar("T")

# Retention is applied this long after start (not at once: the relay is
# serving before a large purge competes with it for the store) and then this often.
RETENTION_FIRST_RUN = 60.0
RETENTION_INTERVAL = 24 * 3600.0


# A worker that dies is started again after this long, doubled while it keeps
# dying young (up to the maximum).
WORKER_RESTART_FIRST = 1.0
WORKER_RESTART_MAX = 60.0
WORKER_YOUNG = 30.0


class Gateway:
    """Everything `serve` runs; with `relay_only`, what a relay worker runs."""

    def __init__(self, config: Config, relay_only: bool = False) -> None:
        self.config = config
        # First: a missing webhook secret stops the start before anything is opened.
        hooks = () if relay_only else endpoints(config)
        self.store = Store.open(config.storage.url)
        self.writer = CaptureWriter(self.store.db)
        self.relay = Relay(config, self.store, self.writer)
        self.mirror: Mirror | None = None
        self.sender: Sender | None = None
        self.http: HttpServer | None = None
        self.webhooks: Webhooks | None = None
        if not relay_only:
            # One set of logins for the mirror and the sender: a mailbox's
            # access token is refreshed once for both.
            credentials = Credentials(config, Mailboxes(self.store.db))
            if config.mirror.enabled:
                self.mirror = Mirror(config, self.store, credentials)
            self.sender = Sender(config, self.store, self.writer, credentials)
            if config.api.enabled:
                self.http = HttpServer(config, self.store)
            self.webhooks = Webhooks(hooks, self.store.db)
        self._retention: asyncio.Task[None] | None = None

    async def start(self, relay_sockets: list[socket.socket] | None = None,
                    freeze: bool = False) -> None:
        """Start everything, the relay last; with `freeze`, keep what starting
        made out of the garbage collector's full passes before it accepts."""
        await self.store.ensure_current()
        await self.writer.start()
        if self.mirror is not None:
            await self.mirror.start()
        if self.sender is not None:
            await self.sender.start()
        if self.http is not None:
            await self.http.start()
        if self.webhooks is not None:
            if self.config.capture.retention_days > 0:
                self._retention = asyncio.create_task(
                    self._apply_retention(self.config.capture.retention_days),
                    name="retention")
            await self.webhooks.start()
        if freeze:
            _spare_startup_objects()
        await self.relay.start(relay_sockets)
        log.info("relay listening on %s:%d, relaying to %s", self.config.relay.listen_host,
                 self.relay.port, self.config.relay.upstream)

    async def stop(self, grace: float | None = None) -> None:
        if self.http is not None:
            await self.http.stop()
        if self._retention is not None:
            # A batch cut short rolls back; the next run purges it.
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
            self._retention = None
        if self.sender is not None:
            await self.sender.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        await self.relay.stop(grace)
        # After the relay: events of the sessions it let finish may still go out.
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.writer.stop()
        await self.store.close()
        log.info("stopped")

    async def _apply_retention(self, retention_days: int) -> None:
        """Purge mail older than `retention_days` now and then, for as long as we run.

        A failed purge is logged and left to the next run: what it missed is
        still old then, and nothing else waits on it.
        """
        delay = RETENTION_FIRST_RUN
        while True:
            await asyncio.sleep(delay)
            delay = RETENTION_INTERVAL
            try:
                result = await apply_retention(self.store, retention_days, "retention")
            except Exception:
                log.exception("the retention purge failed; trying again in %.0f s", delay)
                continue
            log.info("retention: purged %d messages, %d threads and %d outbox messages "
                     "from before %s", result.messages, result.threads, result.outbox,
                     result.cutoff.isoformat())


def _spare_startup_objects() -> None:
    """Keep what starting made (modules, the API, the store's mappings: about
    150,000 objects that live as long as the process) out of the garbage
    collector's full passes, each of which would otherwise stop the event
    loop, and every message in flight, for about 100 ms. Called before the
    relay accepts: the collection it starts with takes about as long."""
    gc.collect()
    gc.freeze()
    log.info("%d objects made at start kept out of garbage collection", gc.get_freeze_count())


def run_on(event_loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a new event loop: uvloop's, or for "asyncio" Python's own."""
    log.info("event loop: %s", event_loop)
    factory = uvloop.new_event_loop if event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def serve(config: Config, workers: int = 1, verbose: bool = False,
                event_loop: str = "uvloop") -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    gateway = Gateway(config)
    pool = None
    try:
        if workers > 1:
            own = listening_sockets(config.relay.listen_host, config.relay.listen_port)
            pool = RelayWorkers(config, own, workers - 1, verbose, event_loop)
            await gateway.start(own, freeze=True)
        else:
            await gateway.start(freeze=True)
    except BaseException:
        await gateway.stop(grace=0)
        raise
    stop = _stop_on_signals()
    supervisor = asyncio.create_task(pool.run(), name="relay workers") if pool else None
    await stop.wait()
    log.info("stopping: finishing the sessions in flight (up to %.0f s)",
             config.relay.shutdown_grace)
    if pool is not None and supervisor is not None:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await asyncio.gather(pool.stop(config.relay.shutdown_grace), gateway.stop())
    else:
        await gateway.stop()


def listening_sockets(host: str, port: int,
                      like: list[socket.socket] | None = None) -> list[socket.socket]:
    """Sockets bound to `host`:`port` with SO_REUSEPORT, one per address `host` has.

    Without `like`, the port must be free (a plain bind is tried first: SO_REUSEPORT
    alone would let a second gateway of the same user share it unnoticed). With
    `like`, the new sockets join the group of those, on the same addresses.
    """
    targets: list[tuple[int, int, int, Any]]
    if like is None:
        targets = [(f, k, p, a) for f, k, p, _, a in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)]
        for family, kind, proto, address in targets:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    else:
        targets = [(s.family, s.type, s.proto, s.getsockname()) for s in like]
    sockets = []
    try:
        for family, kind, proto, address in targets:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(100)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve_relay_worker(config: Config, fds: list[int], parent: int) -> None:
    """A relay worker: the relay alone, on sockets its parent (pid `parent`) listens on."""
    gateway = Gateway(config, relay_only=True)
    try:
        await gateway.start([socket.socket(fileno=fd) for fd in fds], freeze=True)
    except BaseException:
        await gateway.stop(grace=0)
        raise
    stop = _stop_on_signals()
    orphaned = asyncio.create_task(_when_orphaned(parent, stop), name="parent watch")
    await stop.wait()
    orphaned.cancel()
    await gateway.stop()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _when_orphaned(parent: int, stop: asyncio.Event) -> None:
    """Stop a worker whose parent is gone (killed, say): it must not hold the port."""
    while os.getppid() == parent:  # noqa: ASYNC110 - nothing signals a parent's death
        await asyncio.sleep(1.0)
    log.warning("the gateway's main process is gone: stopping this relay worker")
    stop.set()


class RelayWorkers:
    """Relay-only processes, each accepting on its own socket in the relay's group."""

    def __init__(self, config: Config, group: list[socket.socket], count: int,
                 verbose: bool, event_loop: str = "uvloop") -> None:
        self.config = config
        self.group = group
        self.count = count
        self.verbose = verbose
        self.event_loop = event_loop
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self.config.path is not None, "workers read the configuration file"
        sockets = listening_sockets("", 0, like=self.group)
        fds = [s.fileno() for s in sockets]
        command = [sys.executable, "-m", "atsmail", "--config", str(self.config.path), "serve",
                   "--relay-parent", str(os.getpid()), "--event-loop", self.event_loop]
        for fd in fds:
            command += ["--relay-fd", str(fd)]
        if self.verbose:
            command.append("--verbose")
        try:
            process = subprocess.Popen(command, pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            # The worker holds them now: when it dies, what waits on them is
            # refused rather than left hanging, and the others take new clients.
            for sock in sockets:
                sock.close()
        log.info("relay worker %d started", process.pid)
        return process

    async def run(self) -> None:
        """Start the workers and keep them running."""
        started: dict[int, float] = {}
        delays = [WORKER_RESTART_FIRST] * self.count
        for _ in range(self.count):
            process = self._spawn()
            self.processes.append(process)
            started[process.pid] = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            for i, process in enumerate(self.processes):
                code = process.poll()
                if code is None:
                    continue
                lived = time.monotonic() - started.pop(process.pid, 0.0)
                delays[i] = (min(delays[i] * 2, WORKER_RESTART_MAX) if lived < WORKER_YOUNG
                             else WORKER_RESTART_FIRST)
                log.error("relay worker %d exited with %s; starting another in %.0f s",
                          process.pid, code, delays[i])
                await asyncio.sleep(delays[i])
                self.processes[i] = replacement = self._spawn()
                started[replacement.pid] = time.monotonic()

    async def stop(self, grace: float) -> None:
        """SIGTERM to each worker; those still running after `grace` (and a bit) are killed."""
        running = [p for p in self.processes if p.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace + 5
        for process in running:
            try:
                await asyncio.to_thread(process.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("relay worker %d did not stop in time: killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
