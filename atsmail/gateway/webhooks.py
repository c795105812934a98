"""Webhooks: the events the store records, POSTed to the ATS and signed.

The relay, the mirror and the admin commands only record events, in their
own transactions (`atsmail.storage.events`); this worker delivers them on
its own time, so a receiver that is slow or down never holds up mail. Each
configured URL has a deliverer of its own: one URL being down delays no
other. Delivery is at least once: an event whose 2xx is lost on the way (or
that was in flight at shutdown) is sent again, under the same event id.

The signature is HMAC-SHA256, keyed with the URL's secret, over the
timestamp header, a dot, and the exact body bytes: a receiver that checks
it and the timestamp's age knows who sent the event and that it is not an
old one played again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass

import httpx

from atsmail.config import Config, ConfigError
from atsmail.storage.db import Database
from atsmail.storage.events import Due, WebhookQueue

log = logging.getLogger(__name__)

# How often the store is looked at for new events and due retries.
POLL = 1.0
# The longest one POST may take, connecting included.
TIMEOUT = 10.0
# Deliveries claimed at once per URL; they are held (leased) while sent.
BATCH = 20
# How often deliveries to removed URLs, and those failing too long, are dropped.
PRUNE_EVERY = 60.0

EVENT_HEADER = "X-Atsmail-Event"
EVENT_ID_HEADER = "X-Atsmail-Event-Id"
ATTEMPT_HEADER = "X-Atsmail-Attempt"
TIMESTAMP_HEADER = "X-Atsmail-Timestamp"
SIGNATURE_HEADER = "X-Atsmail-Signature"


@dataclass(frozen=True)
class Endpoint:
    url: str
    secret: bytes = b""

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"Endpoint({self.url!r})"


def endpoints(config: Config) -> tuple[Endpoint, ...]:
    """The configured URLs with their secrets; a secret that is not set stops the start.

    Refusing to start beats running without: events recorded meanwhile
    would pile up for a URL that could never be sent them.
    """
    found = []
    for i, hook in enumerate(config.webhooks):
        secret = os.environ.get(hook.secret_env, "")
        if not secret:
            where = f"{config.path}: " if config.path else ""
            raise ConfigError(f"{where}webhook[{i}].secret_env: the variable {hook.secret_env} "
                              f"(the signing secret for {hook.url}) is not set or empty")
        found.append(Endpoint(hook.url, secret.encode()))
    return tuple(found)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The `X-Atsmail-Signature` value: HMAC-SHA256 of `timestamp.body`."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_request(due: Due, secret: bytes, now: float) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt to deliver `due`."""
    body = json.dumps(due.payload(), separators=(",", ":"), ensure_ascii=False).encode()
    timestamp = str(int(now))
    return body, {
        "Content-Type": "application/json",
        EVENT_HEADER: due.type,
        EVENT_ID_HEADER: due.event_id,
        ATTEMPT_HEADER: str(due.attempts),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


class Webhooks:
    """Fans recorded events out to the configured URLs and delivers them.

    Runs with no URL configured too: events are then dropped as they come,
    so that a URL configured later is not sent a backlog from before it.
    """

    def __init__(self, hooks: tuple[Endpoint, ...], db: Database) -> None:
        self.endpoints = hooks
        self.queue = WebhookQueue(db)
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        # Claimed and not yet settled, per URL: given back on stop.
        self._held: dict[str, list[Due]] = {}

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._fan_out(), name="webhook fan-out"))
        if self.endpoints:
            # One client, so each receiver's connection is kept alive between events.
            self._client = client = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False)
            for endpoint in self.endpoints:
                self._held[endpoint.url] = []
                self._tasks.append(asyncio.create_task(
                    self._deliverer(client, endpoint), name=f"webhook {endpoint.url}"))

    async def stop(self) -> None:
        """Stop at once; deliveries claimed but not settled are claimable again."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        held = [due for dues in self._held.values() for due in dues]
        self._held.clear()
        try:
            await self.queue.release(held)
        except Exception:
            # Their leases lapse on their own; only the wait is longer.
            log.warning("webhook deliveries in flight could not be given back", exc_info=True)

    async def _fan_out(self) -> None:
        urls = self.urls
        last_prune = 0.0
        while True:
            try:
                if time.monotonic() - last_prune >= PRUNE_EVERY:
                    removed, given_up = await self.queue.prune(urls)
                    last_prune = time.monotonic()
                    if removed:
                        log.warning("dropped %d webhook deliveries to URLs no longer configured",
                                    removed)
                    if given_up:
                        log.warning("gave up %d webhook deliveries failing for too long",
                                    given_up)
                while await self.queue.fan_out(urls):
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook events could not be queued; trying again")
            await asyncio.sleep(POLL)

    async def _deliverer(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        held = self._held[endpoint.url]
        while True:
            try:
                lease = TIMEOUT * BATCH + POLL
                held[:] = await self.queue.claim(endpoint.url, lease, BATCH)
                full = len(held) == BATCH
                while held:
                    error = await self._post(client, endpoint, held[0])
                    if error is not None:
                        delay = await self.queue.retry(held[0], error)
                        log.warning("webhook %s, event %s (%s), attempt %d: %s; next try in "
                                    "%.0f s", endpoint.url, held[0].event_id, held[0].type,
                                    held[0].attempts, error, delay)
                        # The rest wait behind it, in order.
                        await self.queue.release(held[1:])
                        held.clear()
                        full = False
                        break
                    await self.queue.delivered(held.pop(0))
                if full:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook deliveries to %s failed; trying again", endpoint.url)
            await asyncio.sleep(POLL)

    @staticmethod
    async def _post(client: httpx.AsyncClient, endpoint: Endpoint, due: Due) -> str | None:
        """One attempt; None when the receiver took the event, else why not."""
        body, headers = signed_request(due, endpoint.secret, time.time())
        try:
            # The client's timeout bounds each step alone: a receiver that
            # answers a byte at a time would outlast the delivery's lease.
            async with asyncio.timeout(TIMEOUT):
                response = await client.post(endpoint.url, content=body, headers=headers)
        except TimeoutError:
            return f"no whole answer within {TIMEOUT:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.is_success:
            return None
        if response.is_redirect:
            return (f"answered {response.status_code} (redirects are not followed: configure "
                    "the final URL)")
        return f"answered {response.status_code}"

