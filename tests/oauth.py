"""A local OAuth2 provider for the tests: a token endpoint and an introspection endpoint.

The gateway refreshes access tokens at `token_url` as it would at Google's or
Microsoft's; the test Dovecot and the test submission server check the bearer
tokens they are shown at `introspection_url` (RFC 7662). Both see one set of
grants, so a refresh token revoked here is refused everywhere, and an access
token expired here is refused by every server.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_ID = "atsmail-test-client"
CLIENT_SECRET = "client-secret-for-tests"


@dataclass
class TokenService:
    # Seconds an issued access token lives (told to the client as expires_in).
    lifetime: int = 3600
    # refresh token -> the account it was granted for
    grants: dict[str, str] = field(default_factory=dict)
    # access token -> (account, expiry as time.time())
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    # The account of every refresh that succeeded, in order.
    refreshes: list[str] = field(default_factory=list)
    # Refresh tokens sent back rotated: old -> new (Microsoft does this).
    rotate: bool = False
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def introspection_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/introspect"

    def grant(self, account: str) -> str:
        """A refresh token for `account`, as the provider's consent flow would give."""
        token = "1//rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self.grants[token] = account
        return token

    def revoke(self, refresh_token: str) -> None:
        """The user withdrew consent: the refresh token and its access tokens stop working."""
        with self._lock:
            account = self.grants.pop(refresh_token, None)
            self.tokens = {t: v for t, v in self.tokens.items() if v[0] != account}

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working, before the client expects it."""
        with self._lock:
            self.tokens.clear()

    def issue(self, account: str) -> str:
        """An access token without a refresh, for a test's own client."""
        token = "ya29." + secrets.token_urlsafe(32)
        with self._lock:
            self.tokens[token] = (account, time.time() + self.lifetime)
        return token

    def account_of(self, access_token: str) -> str | None:
        """Whose token this is, if it is live."""
        with self._lock:
            found = self.tokens.get(access_token)
        if found is None or found[1] < time.time():
            return None
        return found[0]

    # --- HTTP ------------------------------------------------------------------

    def start(self) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                if self.path == "/token":
                    status, body = service._token(form)
                elif self.path == "/introspect":
                    status, body = 200, service._introspect(form.get("token", ""))
                else:
                    status, body = 404, {"error": "not_found"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, name="token service",
                         daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return 401, {"error": "invalid_client", "error_description": "Unauthorized client"}
        if form.get("grant_type") != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        refresh_token = form.get("refresh_token", "")
        with self._lock:
            account = self.grants.get(refresh_token)
            if account is not None and self.rotate:
                del self.grants[refresh_token]
                refresh_token = "1//rt-" + secrets.token_urlsafe(24)
                self.grants[refresh_token] = account
        if account is None:
            return 400, {"error": "invalid_grant",
                         "error_description": "Token has been expired or revoked."}
        self.refreshes.append(account)
        body: dict[str, Any] = {"access_token": self.issue(account),
                                "expires_in": self.lifetime, "token_type": "Bearer"}
        if self.rotate:
            body["refresh_token"] = refresh_token
        return 200, body

    def _introspect(self, token: str) -> dict[str, Any]:
        account = self.account_of(token)
        if account is None:
            return {"active": False}
        return {"active": True, "username": account}


def start_token_service() -> TokenService:
    service = TokenService()
    service.start()
    return service


def introspect(url: str, token: str, timeout: float = 5) -> str | None:
    """The account a bearer token belongs to, asked as a resource server asks."""
    data = urllib.parse.urlencode({"token": token}).encode()
    with urllib.request.urlopen(url, data, timeout=timeout) as response:
        body = json.loads(response.read())
    return str(body["username"]) if body.get("active") is True else None
