"""Configuration: read once, at the edge, into frozen dataclasses.

The file is TOML. Every key is known here; an unknown key or a bad value is a
`ConfigError` that names the key and the file, so a typo never silently falls
back to a default. Relative paths (the SQLite file, a Maildir upstream) are
taken relative to the configuration file, so a config works from any
directory.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from atsmail.rules.addresses import AddressError, normalize_address

DEFAULT_PATH = "atsmail.toml"
ENV_VAR = "ATSMAIL_CONFIG"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration file that cannot be used; the text names file and key."""


@dataclass(frozen=True)
class StorageConfig:
    url: str = "sqlite+aiosqlite:///atsmail.db"


@dataclass(frozen=True)
class Upstream:
    """Where relayed mail goes: an SMTP smarthost or a local Maildir."""

    kind: str  # "smtp" | "maildir"
    host: str = ""
    port: int = 25
    path: Path | None = None
    # TLS from the first byte (smtps://), with the certificate checked.
    implicit_tls: bool = False
    # For smtp://: "opportunistic" (STARTTLS when offered, unchecked, as
    # Postfix's `may`), "require" (STARTTLS with a checked certificate, or no
    # delivery) or "none".
    tls: str = "opportunistic"
    # CA certificates to check the upstream's certificate against (PEM);
    # None: the system's.
    ca_file: Path | None = None

    def __str__(self) -> str:
        if self.kind == "maildir":
            return f"maildir:{self.path}"
        scheme = "smtps" if self.implicit_tls else "smtp"
        return f"{scheme}://{_join_host_port(self.host, self.port)}"


@dataclass(frozen=True)
class RelayConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 2525
    upstream: Upstream = field(default_factory=lambda: Upstream("smtp", "127.0.0.1", 25))
    allowed_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    max_message_size: int = 36_700_160
    max_recipients: int = 500
    hostname: str = ""
    upstream_timeout: float = 60.0
    data_timeout: float = 600.0
    idle_timeout: float = 300.0
    shutdown_grace: float = 30.0
    # The admin's certificate and key (PEM): with them the relay offers STARTTLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Clients must say STARTTLS before anything but EHLO, NOOP and QUIT.
    require_tls: bool = False
    # SMTP AUTH (PLAIN, LOGIN: a team member's address and API token) is
    # offered only over TLS unless this is set.
    auth_without_tls: bool = False
    # Per client address and minute, for clients outside allowed_networks
    # (authenticated or not); 0 turns a limit off.
    rate_limit_connections: int = 60
    rate_limit_messages: int = 120
    rate_limit_recipients: int = 600


@dataclass(frozen=True)
class CaptureConfig:
    capture_forwards: bool = True
    # Mail forwarded to this address makes the original's sender a candidate.
    ats_inbox: str = ""
    # Captured mail older than this many days (since its capture) is purged;
    # 0 keeps it until its candidate is deleted.
    retention_days: int = 0


@dataclass(frozen=True)
class ApiConfig:
    """The HTTP API and the review pages."""

    enabled: bool = True
    listen_host: str = "127.0.0.1"
    listen_port: int = 8025
    # The largest request body taken (a message sent through the API included).
    max_body: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class WebhookConfig:
    """A URL that receives the gateway's events, signed with a shared secret.

    The secret itself is read from the variable `secret_env` names when the
    gateway starts, never written into the configuration file.
    """

    url: str
    secret_env: str = ""


@dataclass(frozen=True)
class SecretsConfig:
    """Where the key that encrypts mailbox passwords and tokens lives."""

    key_file: Path = Path("atsmail.key")
    key_env: str = "ATSMAIL_SECRET_KEY"


@dataclass(frozen=True)
class MirrorConfig:
    enabled: bool = True
    # Seconds between checks of folders the server cannot push (no IDLE),
    # and the longest one IDLE waits before it is renewed.
    poll_interval: float = 60.0
    command_timeout: float = 30.0
    reconnect_max: float = 300.0
    backfill_imap_days: int = 14
    backfill_gmail_hours: int = 24
    backfill_outlook_messages: int = 100
    # Seconds a mirror's lease on a mailbox lasts unless renewed (it is
    # renewed every sixth of that): how long the mailboxes of a gateway that
    # died wait before another gateway takes them.
    lease: float = 25.0


GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/common/oauth2/v2.0/token"
OAUTH_PROVIDERS = ("gmail", "outlook")


@dataclass(frozen=True)
class OAuthClient:
    """The gateway's OAuth2 client registration with one provider.

    The client secret is named here (a variable or a file), never written
    into the configuration file, and read only when a token is refreshed.
    """

    token_url: str
    client_id: str = ""
    client_secret_env: str = ""
    client_secret_file: Path | None = None

    @property
    def configured(self) -> bool:
        return bool(self.client_id)


@dataclass(frozen=True)
class OAuthConfig:
    """OAuth2 for gmail and outlook mailboxes connected with a refresh token."""

    gmail: OAuthClient = field(default_factory=lambda: OAuthClient(GOOGLE_TOKEN_URL))
    outlook: OAuthClient = field(default_factory=lambda: OAuthClient(MICROSOFT_TOKEN_URL))
    # Seconds to wait for a token endpoint's answer.
    timeout: float = 30.0

    def client(self, provider: str) -> OAuthClient:
        if provider not in OAUTH_PROVIDERS:
            raise KeyError(provider)
        client: OAuthClient = getattr(self, provider)
        return client


@dataclass(frozen=True)
class DkimConfig:
    """Signing of mail sent from hosted identities; off until all three are set."""

    selector: str = ""
    domain: str = ""
    key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.selector and self.domain and self.key_file)


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    webhooks: tuple[WebhookConfig, ...] = ()
    oauth: OAuthConfig = field(default_factory=OAuthConfig)


def find_config_path(explicit: str | None) -> Path:
    """`--config`, else `$ATSMAIL_CONFIG`, else `./atsmail.toml`."""
    return Path(explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load_config(path: Path) -> Config:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found "
            f"(give --config PATH or set {ENV_VAR}; config.example.toml is a start)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path)


def parse_config(data: Mapping[str, Any], path: Path) -> Config:
    reader = _Reader(path)
    base = path.resolve().parent
    reader.known(data, "", {"storage", "relay", "capture", "secrets", "mirror", "dkim", "oauth",
                            "api", "webhook"})

    storage = reader.table(data, "storage", {"url"})
    relay = reader.table(
        data,
        "relay",
        {
            "listen", "upstream", "allowed_networks", "max_message_size",
            "max_recipients", "hostname", "upstream_timeout", "data_timeout",
            "idle_timeout", "shutdown_grace", "upstream_tls", "upstream_ca_file",
            "tls_cert_file", "tls_key_file", "require_tls", "auth_without_tls",
            "rate_limit_connections", "rate_limit_messages", "rate_limit_recipients",
        },
    )
    capture = reader.table(data, "capture", {"capture_forwards", "ats_inbox", "retention_days"})
    api = reader.table(data, "api", {"enabled", "listen", "max_body"})
    api_defaults = ApiConfig()
    secrets = reader.table(data, "secrets", {"key_file", "key_env"})
    mirror = reader.table(data, "mirror", {
        "enabled", "poll_interval", "command_timeout", "reconnect_max", "backfill_imap_days",
        "backfill_gmail_hours", "backfill_outlook_messages", "lease"})
    mirror_defaults = MirrorConfig()
    dkim = reader.table(data, "dkim", {"selector", "domain", "key_file"})
    oauth = reader.table(data, "oauth", {"timeout", *OAUTH_PROVIDERS})

    api_host, api_port = reader.get(api, "api.listen", str, parse_host_port,
                                    (api_defaults.listen_host, api_defaults.listen_port))
    defaults = RelayConfig()
    listen_host, listen_port = reader.get(
        relay, "relay.listen", str, parse_host_port,
        (defaults.listen_host, defaults.listen_port),
    )
    upstream = reader.get(relay, "relay.upstream", str, lambda v: _parse_upstream(v, base),
                          defaults.upstream)
    if upstream.kind == "smtp":
        upstream = replace(
            upstream,
            tls=reader.get(relay, "relay.upstream_tls", str, _upstream_tls, upstream.tls),
            ca_file=reader.get(relay, "relay.upstream_ca_file", str,
                               lambda v: _existing_file(base / Path(v).expanduser()), None))
    tls_cert_file = reader.get(relay, "relay.tls_cert_file", str,
                               lambda v: _existing_file(base / Path(v).expanduser()), None)
    tls_key_file = reader.get(relay, "relay.tls_key_file", str,
                              lambda v: _existing_file(base / Path(v).expanduser()), None)
    if (tls_cert_file is None) != (tls_key_file is None):
        raise reader.fail("relay.tls_cert_file", "tls_cert_file and tls_key_file go together")
    require_tls = reader.get(relay, "relay.require_tls", bool, bool, defaults.require_tls)
    if require_tls and tls_cert_file is None:
        raise reader.fail("relay.require_tls", "needs tls_cert_file and tls_key_file")
    return Config(
        path=path,
        storage=StorageConfig(
            url=reader.get(storage, "storage.url", str, lambda v: _resolve_sqlite(v, base),
                           _resolve_sqlite(StorageConfig.url, base)),
        ),
        relay=RelayConfig(
            listen_host=listen_host,
            listen_port=listen_port,
            upstream=upstream,
            allowed_networks=reader.get(relay, "relay.allowed_networks", list,
                                        _parse_networks, defaults.allowed_networks),
            max_message_size=reader.get(relay, "relay.max_message_size", int,
                                        _positive, defaults.max_message_size),
            max_recipients=reader.get(relay, "relay.max_recipients", int,
                                      _positive, defaults.max_recipients),
            hostname=reader.get(relay, "relay.hostname", str, _hostname, defaults.hostname),
            upstream_timeout=reader.get(relay, "relay.upstream_timeout", (int, float),
                                        _seconds, defaults.upstream_timeout),
            data_timeout=reader.get(relay, "relay.data_timeout", (int, float),
                                    _seconds, defaults.data_timeout),
            idle_timeout=reader.get(relay, "relay.idle_timeout", (int, float),
                                    _seconds, defaults.idle_timeout),
            shutdown_grace=reader.get(relay, "relay.shutdown_grace", (int, float),
                                      _seconds, defaults.shutdown_grace),
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            require_tls=require_tls,
            auth_without_tls=reader.get(relay, "relay.auth_without_tls", bool, bool,
                                        defaults.auth_without_tls),
            rate_limit_connections=reader.get(relay, "relay.rate_limit_connections", int,
                                              _not_negative, defaults.rate_limit_connections),
            rate_limit_messages=reader.get(relay, "relay.rate_limit_messages", int,
                                           _not_negative, defaults.rate_limit_messages),
            rate_limit_recipients=reader.get(relay, "relay.rate_limit_recipients", int,
                                             _not_negative, defaults.rate_limit_recipients),
        ),
        capture=CaptureConfig(
            capture_forwards=reader.get(capture, "capture.capture_forwards", bool, bool,
                                        CaptureConfig.capture_forwards),
            ats_inbox=reader.get(capture, "capture.ats_inbox", str, _address, ""),
            retention_days=reader.get(capture, "capture.retention_days", int, _not_negative, 0),
        ),
        api=ApiConfig(
            enabled=reader.get(api, "api.enabled", bool, bool, api_defaults.enabled),
            listen_host=api_host,
            listen_port=api_port,
            max_body=reader.get(api, "api.max_body", int, _positive, api_defaults.max_body),
        ),
        webhooks=_webhooks(reader, data.get("webhook", [])),
        secrets=SecretsConfig(
            key_file=reader.get(secrets, "secrets.key_file", str,
                                lambda v: base / Path(v).expanduser(),
                                base / SecretsConfig.key_file),
            key_env=reader.get(secrets, "secrets.key_env", str, str, SecretsConfig.key_env),
        ),
        mirror=MirrorConfig(
            enabled=reader.get(mirror, "mirror.enabled", bool, bool, mirror_defaults.enabled),
            poll_interval=reader.get(mirror, "mirror.poll_interval", (int, float), _seconds,
                                     mirror_defaults.poll_interval),
            command_timeout=reader.get(mirror, "mirror.command_timeout", (int, float), _seconds,
                                       mirror_defaults.command_timeout),
            reconnect_max=reader.get(mirror, "mirror.reconnect_max", (int, float), _seconds,
                                     mirror_defaults.reconnect_max),
            backfill_imap_days=reader.get(mirror, "mirror.backfill_imap_days", int, _positive,
                                          mirror_defaults.backfill_imap_days),
            backfill_gmail_hours=reader.get(mirror, "mirror.backfill_gmail_hours", int,
                                            _positive, mirror_defaults.backfill_gmail_hours),
            backfill_outlook_messages=reader.get(
                mirror, "mirror.backfill_outlook_messages", int, _positive,
                mirror_defaults.backfill_outlook_messages),
            lease=reader.get(mirror, "mirror.lease", (int, float), _seconds,
                             mirror_defaults.lease),
        ),
        dkim=DkimConfig(
            selector=reader.get(dkim, "dkim.selector", str, str, ""),
            domain=reader.get(dkim, "dkim.domain", str, str, ""),
            key_file=reader.get(dkim, "dkim.key_file", str,
                                lambda v: base / Path(v).expanduser(), None),
        ),
        oauth=OAuthConfig(
            gmail=_oauth_client(reader, oauth, "gmail", GOOGLE_TOKEN_URL, base),
            outlook=_oauth_client(reader, oauth, "outlook", MICROSOFT_TOKEN_URL, base),
            timeout=reader.get(oauth, "oauth.timeout", (int, float), _seconds,
                               OAuthConfig.timeout),
        ),
    )


def _webhooks(reader: _Reader, tables: Any) -> tuple[WebhookConfig, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise reader.fail("webhook", "must be an array of tables ([[webhook]])")
    hooks: list[WebhookConfig] = []
    for i, table in enumerate(tables):
        name = f"webhook[{i}]"
        reader.known(table, f"{name}.", {"url", "secret_env"})
        if "url" not in table:
            raise reader.fail(f"{name}.url", "missing: where to deliver the events")
        hook = WebhookConfig(
            url=reader.get(table, f"{name}.url", str, _webhook_url, ""),
            secret_env=reader.get(table, f"{name}.secret_env", str, str.strip, ""))
        # Unsigned events would let anyone who finds the URL forge them.
        if not hook.secret_env:
            raise reader.fail(f"{name}.secret_env",
                              "missing: the variable that holds the signing secret")
        if hook.url in (h.url for h in hooks):
            raise reader.fail(f"{name}.url", f"{hook.url} is listed twice")
        hooks.append(hook)
    return tuple(hooks)


def _webhook_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


def _oauth_client(reader: _Reader, oauth: Mapping[str, Any], provider: str, token_url: str,
                  base: Path) -> OAuthClient:
    name = f"oauth.{provider}"
    table = reader.table(oauth, provider, {"token_url", "client_id", "client_secret_env",
                                           "client_secret_file"}, prefix="oauth.")
    client = OAuthClient(
        token_url=reader.get(table, f"{name}.token_url", str, _token_url, token_url),
        client_id=reader.get(table, f"{name}.client_id", str, str.strip, ""),
        client_secret_env=reader.get(table, f"{name}.client_secret_env", str, str.strip, ""),
        client_secret_file=reader.get(table, f"{name}.client_secret_file", str,
                                      lambda v: base / Path(v).expanduser(), None),
    )
    if client.client_secret_env and client.client_secret_file:
        raise reader.fail(f"{name}.client_secret_env",
                          "give client_secret_env or client_secret_file, not both")
    if (client.client_secret_env or client.client_secret_file) and not client.client_id:
        raise reader.fail(f"{name}.client_id", "a client secret needs its client_id")
    return client


def _token_url(value: str) -> str:
    """An https URL; plain http only to this machine, so no secret crosses a network bare."""
    parsed = urllib.parse.urlsplit(value)
    local = parsed.hostname in ("127.0.0.1", "::1", "localhost")
    if not parsed.hostname or not (parsed.scheme == "https" or
                                   (parsed.scheme == "http" and local)):
        raise ValueError(f"expected an https:// URL (http:// only to this machine), "
                         f"got {value!r}")
    return value


T = TypeVar("T")


class _Reader:
    """Type-checks values and turns every problem into one `ConfigError`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")

    def known(self, table: Mapping[str, Any], prefix: str, keys: set[str]) -> None:
        for key in table:
            if key not in keys:
                raise self.fail(f"{prefix}{key}", "unknown key")

    def table(self, data: Mapping[str, Any], name: str, keys: set[str],
              prefix: str = "") -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(f"{prefix}{name}", "must be a table")
        self.known(value, f"{prefix}{name}.", keys)
        return value

    def get(
        self,
        table: Mapping[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        convert: Callable[[Any], T],
        default: T,
    ) -> T:
        name = key.rsplit(".", 1)[-1]
        if name not in table:
            return default
        value = table[name]
        # bool is an int in Python; a number setting must not accept `true`.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        try:
            return convert(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list": "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def _address(value: str) -> str:
    if not value:
        return ""
    try:
        return normalize_address(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _hostname(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?", value):
        raise ValueError(f"not a host name: {value!r}")
    return value


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _not_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _seconds(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    return float(value)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port`; the port may be left out when a default exists."""
    host, sep, port = value.rpartition(":")
    if value.startswith("[") and "]" in value:
        host, _, rest = value[1:].partition("]")
        sep, port = (":", rest[1:]) if rest.startswith(":") else ("", "")
    elif not sep or ":" in host:
        host, port = value, ""
    if not port:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {value!r}")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    return host, int(port)


def _parse_upstream(value: str, base: Path) -> Upstream:
    if value.startswith("maildir:"):
        raw = value.removeprefix("maildir:")
        if not raw:
            raise ValueError("maildir: needs a path, e.g. maildir:/var/mail/atsmail")
        return Upstream("maildir", path=base / Path(raw).expanduser())
    for scheme, default_port in (("smtp://", 25), ("smtps://", 465)):
        if value.startswith(scheme):
            host, port = parse_host_port(value.removeprefix(scheme).rstrip("/"), default_port)
            if not host:
                raise ValueError(f"missing host in {value!r}")
            return Upstream("smtp", host=host, port=port, implicit_tls=scheme == "smtps://")
    raise ValueError(
        f"expected smtp://HOST[:PORT], smtps://HOST[:PORT] or maildir:PATH, got {value!r}")


UPSTREAM_TLS = ("opportunistic", "require", "none")


def _upstream_tls(value: str) -> str:
    if value not in UPSTREAM_TLS:
        raise ValueError(f"expected one of {', '.join(UPSTREAM_TLS)}, got {value!r}")
    return value


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _parse_networks(value: list[Any]) -> tuple[Network, ...]:
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected network strings like '127.0.0.0/8', got {item!r}")
        networks.append(ipaddress.ip_network(item, strict=False))
    return tuple(networks)


def _resolve_sqlite(url: str, base: Path) -> str:
    """Make a relative SQLite path relative to the config file's folder."""
    if not url.startswith(("sqlite+aiosqlite:", "postgresql+asyncpg:")):
        raise ValueError("expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://..., "
                         f"got {url.split(':', 1)[0]}:...")
    scheme, sep, rest = url.partition(":///")
    if not sep:
        if url.startswith("sqlite"):
            raise ValueError("expected sqlite+aiosqlite:///PATH")
        return url
    if not scheme.startswith("sqlite") or rest.startswith("/") or rest.startswith(":memory:"):
        return url
    return f"{scheme}:///{base / rest}"
