"""What a connected mailbox logs in with: its password, or an OAuth2 access token.

The mirror and the sender both ask here, so each mailbox's access token is
refreshed in one place and shared between them. Access tokens live in memory
only (the store holds just the sealed refresh token); one is refreshed
shortly before it expires, and once more when a server refuses it, because a
provider may end a token early without telling the gateway. A refresh token
the provider rotates replaces the stored one.

The token endpoint is one form POST (RFC 6749 section 6), made with the
standard library in a thread and bounded by `[oauth] timeout`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from atsmail.config import Config, OAuthClient
from atsmail.secrets import Secrets
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.models import Mailbox

T = TypeVar("T")

# A token this close to its expiry (or half its life, if that is shorter) is
# refreshed first: a login started with it must not be refused half-way.
EXPIRY_MARGIN = 60.0
# Providers that do not say how long a token lives issue hour-long ones.
DEFAULT_LIFETIME = 3600
# No honest token endpoint answers with more than this.
MAX_ANSWER = 1 << 20


class CredentialsError(Exception):
    """No login can be had for now: the token endpoint failed or could not be reached."""


class CredentialsRefusedError(CredentialsError):
    """The provider refused the refresh token or the client; an admin must act."""


@dataclass(frozen=True)
class Login:
    """A user name with a password, or with an OAuth2 access token (for XOAUTH2)."""

    username: str
    secret: str = field(repr=False)
    oauth2: bool = False
    # An access token from the cache: if a server refuses it, it may have gone
    # stale, and a fresh one is worth one more try.
    cached: bool = False


@dataclass(frozen=True)
class _AccessToken:
    value: str = field(repr=False)
    refresh_at: float  # time.monotonic()


class Credentials:
    """Logins for connected mailboxes, with access tokens cached per mailbox."""

    def __init__(self, config: Config, mailboxes: Mailboxes) -> None:
        self.config = config
        self.mailboxes = mailboxes
        # Keyed by the mailbox's address and connection time: a mailbox
        # connected again (perhaps to another account) never gets the old token.
        self._tokens: dict[tuple[str, datetime], _AccessToken] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def attempt(self, box: Mailbox, work: Callable[[Login], Awaitable[T]],
                      refused: type[Exception] | tuple[type[Exception], ...]) -> T:
        """Run `work` with the mailbox's login.

        When it raises `refused` (the server turned the login down) for a
        cached access token, the token is refreshed and `work` runs once more.
        """
        login = await self.login(box)
        try:
            return await work(login)
        except refused:
            if not login.cached:
                raise
            self._forget(box, login)
        return await work(await self.login(box))

    async def login(self, box: Mailbox) -> Login:
        if box.auth != "oauth2":
            return Login(box.username, Secrets.load(self.config.secrets).open(box.secret))
        key = (box.address, box.created_at)
        lock = self._locks.setdefault(box.address, asyncio.Lock())
        # One refresh per mailbox at a time: the mirror and the sender share it.
        async with lock:
            token = self._tokens.get(key)
            if token is not None and time.monotonic() < token.refresh_at:
                return Login(box.username, token.value, oauth2=True, cached=True)
            token = await self._refresh(box)
            self._tokens[key] = token
        return Login(box.username, token.value, oauth2=True)

    def _forget(self, box: Mailbox, login: Login) -> None:
        key = (box.address, box.created_at)
        token = self._tokens.get(key)
        if token is not None and token.value == login.secret:
            del self._tokens[key]

    async def _refresh(self, box: Mailbox) -> _AccessToken:
        client = self.config.oauth.client(box.provider)
        section = f"[oauth.{box.provider}]"
        where = f" in {self.config.path}" if self.config.path else ""
        if not client.configured:
            raise CredentialsRefusedError(
                f"no OAuth2 client for {box.provider}: set {section} client_id{where}")
        # The stored token, not the caller's copy: it may have been rotated.
        current = await self.mailboxes.get(box.address)
        secrets = Secrets.load(self.config.secrets)
        form = {"grant_type": "refresh_token", "refresh_token": secrets.open(current.secret),
                "client_id": client.client_id}
        client_secret = _client_secret(client, box.provider)
        if client_secret:
            form["client_secret"] = client_secret
        timeout = self.config.oauth.timeout
        try:
            status, answer = await asyncio.wait_for(
                asyncio.to_thread(_post, client.token_url, form, timeout), timeout + 1)
        except (OSError, TimeoutError) as exc:
            raise CredentialsError(f"cannot reach the {box.provider} token endpoint "
                                   f"{client.token_url}: {_describe(exc)}") from None
        if status == 200 and isinstance(answer.get("access_token"), str):
            return await self._accept(box, current, answer, secrets)
        error = str(answer.get("error") or f"HTTP {status}")
        detail = f"{error}: {answer['error_description']}" if isinstance(
            answer.get("error_description"), str) else error
        if error == "invalid_grant":
            raise CredentialsRefusedError(
                f"the {box.provider} token endpoint refused the refresh token ({detail}); "
                "it was revoked or has expired: connect the mailbox again with a new one")
        if error in ("invalid_client", "unauthorized_client"):
            raise CredentialsRefusedError(
                f"the {box.provider} token endpoint refused the client ({detail}): check "
                f"{section} client_id and its client secret{where}")
        if 400 <= status < 500 and "error" in answer:
            raise CredentialsRefusedError(
                f"the {box.provider} token endpoint refused the refresh ({detail})")
        raise CredentialsError(f"the {box.provider} token endpoint failed ({detail})")

    async def _accept(self, box: Mailbox, current: Mailbox, answer: dict[str, Any],
                      secrets: Secrets) -> _AccessToken:
        token_type = answer.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise CredentialsError(f"the {box.provider} token endpoint issued a "
                                   f"{token_type!r} token, not a bearer token")
        lifetime = answer.get("expires_in", DEFAULT_LIFETIME)
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)  # some endpoints send it as a string
        if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_LIFETIME
        rotated = answer.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != secrets.open(current.secret):
            await self.mailboxes.replace_secret(box.address, current.secret,
                                                secrets.seal(rotated))
        margin = min(EXPIRY_MARGIN, lifetime / 2)
        return _AccessToken(str(answer["access_token"]), time.monotonic() + lifetime - margin)


def _client_secret(client: OAuthClient, provider: str) -> str:
    """The client secret the configuration names; public clients have none."""
    if client.client_secret_env:
        value = os.environ.get(client.client_secret_env, "").strip()
        if not value:
            raise CredentialsRefusedError(
                f"${client.client_secret_env} (oauth.{provider}.client_secret_env) is empty "
                "or not set")
        return value
    if client.client_secret_file is not None:
        try:
            return client.client_secret_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsRefusedError(
                f"cannot read oauth.{provider}.client_secret_file: {exc}") from None
    return ""


def _post(url: str, form: dict[str, str], timeout: float) -> tuple[int, dict[str, Any]]:
    """POST a form; (HTTP status, the JSON object answered, or {} if it was none)."""
    request = urllib.request.Request(
        url, urllib.parse.urlencode(form).encode(), method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded",
                 "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), _json(response.read(MAX_ANSWER))
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _json(exc.read(MAX_ANSWER))


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason) or type(exc).__name__
    return str(exc) or type(exc).__name__
