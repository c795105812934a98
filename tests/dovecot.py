"""A real Dovecot IMAP server for the tests, run unprivileged on a free loopback port.

One server per test session; each test uses users of its own (any name
logs in with the one password), so tests never see each other's mail.
"""

from __future__ import annotations

import imaplib
import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Dovecot runs mail processes as this unprivileged user (it refuses root).
MAIL_UID = MAIL_GID = 65534
# Every user has this password (a static passdb: users need no set-up, and
# any other password is refused).
PASSWORD = "mailbox-secret"

# With OAuth2, bearer tokens are checked at the test token service's
# introspection endpoint (RFC 7662: POST token=..., {"active": true, "username":
# ...}); the static password still serves the tests' own delivery logins.
OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/dovecot-oauth2.conf.ext
}}
"""
OAUTH2_CONFIG = """\
introspection_mode = post
introspection_url = {introspection_url}
username_attribute = username
active_attribute = active
active_value = true
force_introspection = yes
timeout_msecs = 5000
"""

CONFIG = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
# Every test logs in from 127.0.0.1: one test's wrong password must not slow
# the others' logins down (Dovecot's per-address auth penalty).
login_trusted_networks = 127.0.0.0/8
auth_failure_delay = 0
passdb {{
  driver = static
  args = password={password}
{static_mechanisms}}}
{oauth2_passdb}userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
mail_location = maildir:{root}/mail/%u
default_internal_user = nobody
default_login_user = nobody
default_internal_group = nogroup
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
service anvil {{
  chroot =
}}
namespace inbox {{
  inbox = yes
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Archive {{
    special_use = \\Archive
    auto = subscribe
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Dovecot:
    root: Path
    port: int
    # With a certificate: STARTTLS on `port`, implicit TLS on `tls_port`.
    cert: Path | None = None
    key: Path | None = None
    tls_port: int = 0
    # With an introspection URL, XOAUTH2 and OAUTHBEARER logins are checked there.
    introspection_url: str = ""
    process: subprocess.Popen[bytes] | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def start(self) -> None:
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir(parents=True)
        shutil.chown(self.root / "mail", MAIL_UID, MAIL_GID)
        ssl = (f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{self.key}"
               if self.cert else "ssl = no")
        self.tls_port = self.tls_port or free_port()
        oauth2 = bool(self.introspection_url)
        if oauth2:
            (self.root / "dovecot-oauth2.conf.ext").write_text(
                OAUTH2_CONFIG.format(introspection_url=self.introspection_url))
        (self.root / "dovecot.conf").write_text(CONFIG.format(
            root=self.root, port=self.port, tls_port=self.tls_port, ssl=ssl, password=PASSWORD,
            uid=MAIL_UID, gid=MAIL_GID,
            mechanisms="plain login xoauth2 oauthbearer" if oauth2 else "plain login",
            # The static password must not log in XOAUTH2 users: a token is
            # only ever checked at the token service.
            static_mechanisms="  mechanisms = plain login\n" if oauth2 else "",
            oauth2_passdb=OAUTH2_PASSDB.format(root=self.root) if oauth2 else ""))
        self._spawn()

    def restart(self) -> None:
        """Stop the server and start it again on the same ports and mail."""
        self.stop()
        self._spawn()

    def _spawn(self) -> None:
        with (self.root / "stdout.log").open("ab") as out:
            # Its master keeps stdio open: never a pipe.
            self.process = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.root / "dovecot.conf")],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError("dovecot did not start:\n" + self.log())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        parts = [p.read_text(errors="replace") for p in
                 (self.root / "stdout.log", self.root / "dovecot.log") if p.exists()]
        return "\n".join(parts)[-3000:]

    def add_user(self, name: str = "user") -> tuple[str, str]:
        """A fresh, empty mailbox: (address, password)."""
        return f"{name}{next(self._ids)}@example.com", PASSWORD

    def kick(self, address: str) -> None:
        """End the user's sessions, as a server restart or a network drop would."""
        subprocess.run(["doveadm", "-c", str(self.root / "dovecot.conf"), "kick", address],
                       check=True, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)

    def sessions(self) -> dict[str, int]:
        """How many IMAP sessions each user has open now."""
        listed = subprocess.run(
            ["doveadm", "-c", str(self.root / "dovecot.conf"), "who", "-1"],
            check=True, capture_output=True, timeout=10, stdin=subprocess.DEVNULL, text=True)
        counts: dict[str, int] = {}
        for line in listed.stdout.splitlines()[1:]:  # under a header line
            user = line.split()[0]
            counts[user] = counts.get(user, 0) + 1
        return counts

    def client(self, address: str, password: str) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        client.login(address, password)
        return client

    def deliver(self, address: str, password: str, raw: bytes, folder: str = "INBOX",
                when: float | None = None) -> None:
        """Put a message into a folder, as delivery or the user's client would."""
        client = self.client(address, password)
        try:
            date = imaplib.Time2Internaldate(when) if when is not None else None
            typ, data = client.append(folder, None, date, raw)
            assert typ == "OK", data
        finally:
            client.logout()


def start_dovecot(tls: bool = False, introspection_url: str = "") -> Dovecot | None:
    """A running server, or None when this machine has no Dovecot.

    With `tls`, it has a self-signed certificate for 127.0.0.1, written to
    `root/cert.pem` for clients to trust. With `introspection_url`, it also
    takes OAuth2 bearer tokens, checked there.
    """
    if shutil.which("dovecot") is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="atsm-dv-", dir="/tmp"))  # short: socket paths
    root.chmod(0o755)  # its unprivileged processes read files here
    server = Dovecot(root, free_port(), introspection_url=introspection_url)
    if tls:
        server.cert, server.key = self_signed(root)
    server.start()
    return server


def self_signed(root: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o644)  # read by Dovecot's unprivileged processes
    return cert_path, key_path
