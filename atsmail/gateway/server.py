"""The running gateway: the store, the capture writer, the relay, mirror, sender,
webhooks and HTTP API, and the daily purge of mail past its retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

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

# Retention is applied this long after start (not at once: the relay is
# serving before a large purge competes with it for the store) and then this often.
RETENTION_FIRST_RUN = 60.0
RETENTION_INTERVAL = 24 * 3600.0


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        # First: a missing webhook secret stops the start before anything is opened.
        hooks = endpoints(config)
        self.store = Store.open(config.storage.url)
        self.writer = CaptureWriter(self.store.db)
        self.relay = Relay(config, self.store, self.writer)
        # One set of logins for the mirror and the sender: a mailbox's access
        # token is refreshed once for both.
        credentials = Credentials(config, Mailboxes(self.store.db))
        self.mirror = (Mirror(config, self.store, credentials)
                       if config.mirror.enabled else None)
        self.sender = Sender(config, self.store, self.writer, credentials)
        self.http = HttpServer(config, self.store) if config.api.enabled else None
        self._retention: asyncio.Task[None] | None = None
        self.webhooks = Webhooks(hooks, self.store.db)

    async def start(self) -> None:
        await self.store.ensure_current()
        await self.writer.start()
        await self.relay.start()
        if self.mirror is not None:
            await self.mirror.start()
        await self.sender.start()
        if self.http is not None:
            await self.http.start()
        if self.config.capture.retention_days > 0:
            self._retention = asyncio.create_task(
                self._apply_retention(self.config.capture.retention_days), name="retention")
        await self.webhooks.start()
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
        await self.sender.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        await self.relay.stop(grace)
        # After the relay: events of the sessions it let finish may still go out.
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


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    gateway = Gateway(config)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop(grace=0)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing the sessions in flight (up to %.0f s)",
             config.relay.shutdown_grace)
    await gateway.stop()
