"""The running gateway: the store, the capture writer, the relay, mirror, sender and webhooks."""

from __future__ import annotations

import asyncio
import logging
import signal

from atsmail.config import Config
from atsmail.gateway.credentials import Credentials
from atsmail.gateway.mirror import Mirror
from atsmail.gateway.relay import Relay
from atsmail.gateway.sender import Sender
from atsmail.gateway.webhooks import Webhooks, endpoints
from atsmail.storage import CaptureWriter, Store
from atsmail.storage.mailboxes import Mailboxes

log = logging.getLogger(__name__)


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
        self.mirror = (Mirror(config, self.store, self.writer, credentials)
                       if config.mirror.enabled else None)
        self.sender = Sender(config, self.store, self.writer, credentials)
        self.webhooks = Webhooks(hooks, self.store.db)

    async def start(self) -> None:
        await self.store.ensure_current()
        await self.writer.start()
        await self.relay.start()
        if self.mirror is not None:
            await self.mirror.start()
        await self.sender.start()
        await self.webhooks.start()
        log.info("relay listening on %s:%d, relaying to %s", self.config.relay.listen_host,
                 self.relay.port, self.config.relay.upstream)

    async def stop(self, grace: float | None = None) -> None:
        await self.sender.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        await self.relay.stop(grace)
        # After the relay: events of the sessions it let finish may still go out.
        await self.webhooks.stop()
        await self.writer.stop()
        await self.store.close()
        log.info("stopped")


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
