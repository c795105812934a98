"""The `atsmail` command as a user runs it: exit codes, messages, JSON shapes.

The last tests run `atsmail serve` as a real process and mail through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import CliRunner, Result

from atsmail.cli import main
from atsmail.config import load_config
from atsmail.storage import Store
from atsmail.storage.access import Access
from atsmail.storage.mailboxes import Mailboxes
from atsmail.storage.models import AuditEntry
from tests.conftest import make_mail
from tests.storage.test_retention import captured_days_ago
from tests.storage.test_store import capture

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "atsmail.toml"
    path.write_text(f"""
[storage]
url = "sqlite+aiosqlite:///store/atsmail.db"

[relay]
listen = "127.0.0.1:{free_port()}"
upstream = "maildir:delivered"
allowed_networks = ["127.0.0.0/8"]

[api]
listen = "127.0.0.1:{free_port()}"
""")
    return path


class Cli:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = self.runner.invoke(main, ["--config", str(self.config), *args])
        assert result.exit_code == code, (result.output, result.exception)
        return result

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def cli(config_file: Path) -> Cli:
    run = Cli(config_file)
    run("init")
    return run


def test_init_creates_the_store_next_to_the_config(config_file: Path) -> None:
    result = Cli(config_file)("init")
    assert (config_file.parent / "store" / "atsmail.db").exists()
    assert "store ready" in result.stdout


def test_commands_before_init_say_what_to_do(config_file: Path) -> None:
    result = Cli(config_file)("user", "list", code=1)
    assert "run `atsmail init`" in result.stderr
    assert "Traceback" not in result.output


def test_schema_shows_where_the_store_stands_and_goes_back_for_an_older_version(
        cli: Cli) -> None:
    cli("candidate", "add", "C-1", "--name", "Ada", "--email", "ada@applicant.test")
    shown = cli.json("schema", "show")
    assert isinstance(shown, dict)
    assert (shown["store"], shown["this_version"], shown["condition"]) == ("0012", "0012",
                                                                           "current")
    assert [r["revision"] for r in shown["revisions"] if r["applied"]][-1] == "0012"
    assert "unknown schema revision '12'" in cli("schema", "downgrade", "12", code=1).stderr
    assert "nothing to take back" in cli("schema", "downgrade", "0012", code=1).stderr
    # It asks first, and says what goes.
    asked = cli.runner.invoke(main, ["--config", str(cli.config), "schema", "downgrade",
                                     "0010"], input="n\n")
    assert asked.exit_code == 1
    assert "0012  message_bodies" in asked.stdout and "0011  messages" in asked.stdout
    assert "0010  " not in asked.stdout
    assert cli.json("schema", "show")["store"] == "0012"  # type: ignore[index]
    assert "is at 0010" in cli("schema", "downgrade", "0010", "--yes").stdout
    # This version's commands then say what to do; init brings it back, mail and all.
    assert "at 0010, older than this version's 0012: run `atsmail init`" in cli(
        "candidate", "list", code=1).stderr
    shown_text = cli("schema", "show").stdout
    assert "older than this version's 0012" in shown_text
    assert [line.split()[:2] for line in shown_text.splitlines()[-3:]] == [
        ["0010", "applied"], ["0011", "-"], ["0012", "-"]]
    cli("init")
    assert "C-1" in cli("candidate", "list").stdout


@pytest.mark.parametrize(("content", "expected"), [
    ("[relay]\nlisten = 25\n", "relay.listen: expected a string, got int"),
    ("[relay]\nlistne = '127.0.0.1:25'\n", "relay.listne: unknown key"),
    ("[relya]\n", "relya: unknown key"),
    ("[relay]\nupstream = 'ftp://x'\n", "relay.upstream: expected smtp://HOST[:PORT]"),
    ("[relay]\nallowed_networks = ['10.0.0.0/33']\n", "relay.allowed_networks"),
    ("[relay]\nmax_recipients = 0\n", "relay.max_recipients: must be positive"),
    ("[relay]\nmax_message_size = true\n", "relay.max_message_size: expected an integer"),
    ("[capture]\ncapture_forwards = 'yes'\n", "capture.capture_forwards: expected true or"),
    ("[relay\n", "not valid TOML"),
    ("[relay]\nupstream = 'smtp://'\n", "relay.upstream: missing host"),
    ("[relay]\nupstream_timeout = nan\n", "relay.upstream_timeout: must be a positive"),
    ("[relay]\nhostname = \"a\\r\\nb\"\n", "relay.hostname: not a host name"),
    ("[storage]\nurl = 'postgres://x/y'\n", "storage.url: expected sqlite+aiosqlite"),
    ("[oauth.yahoo]\n", "oauth.yahoo: unknown key"),
    ("[oauth.gmail]\nclient_secret = 'x'\n", "oauth.gmail.client_secret: unknown key"),
    ("[oauth.gmail]\ntoken_url = 'http://idp.example/token'\n",
     "oauth.gmail.token_url: expected an https:// URL"),
    ("[oauth.outlook]\nclient_id = 'a'\nclient_secret_env = 'S'\nclient_secret_file = 's'\n",
     "oauth.outlook.client_secret_env: give client_secret_env or client_secret_file"),
    ("[oauth.outlook]\nclient_secret_env = 'S'\n", "oauth.outlook.client_id: a client secret"),
    ("[oauth]\ntimeout = 0\n", "oauth.timeout: must be a positive"),
    ("[mirror]\nlease = 0\n", "mirror.lease: must be a positive"),
    ("[relay]\nupstream_tls = 'always'\n",
     "relay.upstream_tls: expected one of opportunistic, require, none"),
    ("[relay]\nupstream_ca_file = 'missing.pem'\n", "relay.upstream_ca_file: no such file"),
    ("[relay]\ntls_cert_file = 'bad.toml'\n", "tls_cert_file and tls_key_file go together"),
    ("[relay]\nrequire_tls = true\n", "relay.require_tls: needs tls_cert_file"),
    ("[relay]\nrate_limit_messages = -1\n", "relay.rate_limit_messages: must be 0 or more"),
])
def test_bad_configuration_names_the_file_and_key(tmp_path: Path, content: str,
                                                  expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = Cli(path)("init", code=1)
    assert str(path) in result.stderr
    assert expected in result.stderr


def test_config_is_found_through_the_environment(tmp_path: Path, config_file: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("ATSMAIL_CONFIG", str(config_file))
    assert CliRunner().invoke(main, ["init"]).exit_code == 0
    monkeypatch.delenv("ATSMAIL_CONFIG")
    missing = CliRunner().invoke(main, ["init"])
    assert missing.exit_code == 1 and "atsmail.toml: configuration file not found" in (
        missing.stderr)


def test_bad_usage_exits_2(cli: Cli) -> None:
    cli("candidate", "add", "C-1", code=2)
    cli("user", "add", "a@b.test", "--role", "king", code=2)
    cli("no-such-command", code=2)


def test_team_domains_and_jobs(cli: Cli) -> None:
    cli("user", "add", "Rita@Example.com", "--name", "Rita", "--role", "admin")
    [rita] = cli.json("user", "list")  # type: ignore[misc]
    assert {k: rita[k] for k in ("email", "name", "role", "hosted_address")} == {
        "email": "rita@example.com", "name": "Rita", "role": "admin", "hosted_address": None}
    assert "already a team member" in cli("user", "add", "rita@example.com", code=1).stderr
    cli("domain", "add", "example.com")
    assert [d["domain"] for d in cli.json("domain", "list")] == ["example.com"]  # type: ignore[union-attr,index]
    cli("domain", "remove", "example.com")
    assert cli.json("domain", "list") == []
    assert "not an internal domain" in cli("domain", "remove", "example.com", code=1).stderr
    cli("job", "add", "J1", "--title", "Engineer")
    cli("job", "archive", "J1")
    assert [{k: j[k] for k in ("id", "title", "archived", "candidates")}
            for j in cli.json("job", "list")] == [  # type: ignore[union-attr]
        {"id": "J1", "title": "Engineer", "archived": True, "candidates": 0}]
    cli("job", "reopen", "J1")
    assert "unknown job" in cli("job", "archive", "J2", code=1).stderr
    # Configuration changes from the CLI are audited like the API's.
    actions = [e.action for e in asyncio.run(_audit(cli))]
    assert actions == ["domain.remove", "domain.add", "user.put"]


async def _audit(cli: Cli) -> list[AuditEntry]:
    return await _in_store(cli.config, lambda store: Access(store.db).audit())


async def _in_store(config_file: Path, work: Callable[[Store], Awaitable[T]]) -> T:
    """`work` on the store that `config_file` names, opened for it alone."""
    store = Store.open(load_config(config_file).storage.url)
    try:
        return await work(store)
    finally:
        await store.close()


def test_tokens(cli: Cli) -> None:
    cli("user", "add", "rita@example.com")
    assert "not a team member" in cli("token", "create", "nobody@example.com", code=1).stderr
    made = cli.json("token", "create", "rita@example.com")
    assert isinstance(made, dict) and set(made) == {"token", "id"}
    assert made["token"].startswith("atsm_")
    listed = cli.json("token", "list")
    assert isinstance(listed, list) and [(t["id"], t["user"], t["revoked"]) for t in listed] == [
        (made["id"], "rita@example.com", False)]
    assert made["token"] not in cli("token", "list").stdout
    cli("token", "revoke", str(made["id"]))
    assert cli.json("token", "list")[0]["revoked"] is True  # type: ignore[index]
    assert "unknown token 99" in cli("token", "revoke", "99", code=1).stderr


@pytest.mark.parametrize("address", ["a,b@c.test", "x@[1.2.3.4]", "x y@c.test", "no-at"])
def test_bad_candidate_addresses_are_refused(cli: Cli, address: str) -> None:
    result = cli("candidate", "add", "C-1", "--name", "Ada", "--email", address, code=1)
    assert "not a mail address" in result.stderr


def test_candidates_show_their_notices(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("job", "add", "J1", "--title", "Engineer")
    added = cli("candidate", "add", "C-1", "--name", "Ada", "--email", "ada@applicant.test",
                "--email", "ada@example.com", "--job", "J1")
    assert "ada@example.com was not added" in added.stderr
    shown = cli.json("candidate", "show", "C-1")
    assert isinstance(shown, dict)
    assert shown["emails"] == ["ada@applicant.test"]
    assert shown["jobs"] == [{"id": "J1", "archived": False}]
    assert [set(n) for n in shown["notices"]] == [{"text", "at"}]
    assert [c["id"] for c in cli.json("candidate", "list")] == ["C-1"]  # type: ignore[union-attr,index]
    assert "unknown candidate" in cli("candidate", "show", "C-2", code=1).stderr
    cli("candidate", "delete", "C-1")
    assert cli.json("candidate", "list") == []


def test_import_adds_every_good_record_and_reports_the_bad(cli: Cli, tmp_path: Path) -> None:
    cli("job", "add", "J1", "--title", "Engineer")
    jsonl = tmp_path / "candidates.jsonl"
    jsonl.write_text(
        '{"id": "C-1", "name": "Ada", "emails": ["ada@a.test"], "jobs": ["J1"]}\n'
        '{"id": "C-2", "name": "Bob", "emails": "bob@b.test"}\n'
        "not json\n"
        '{"id": "C-3", "name": "Cy", "emails": ["cy@c.test"], "jobs": ["NOPE"]}\n'
        '{"id": "C-4", "name": "Di", "emails": ["di@d.test"], "colour": "red"}\n')
    result = cli("candidate", "import", str(jsonl), code=1)
    assert "imported 2 candidates" in result.stdout
    assert "line 3: not JSON" in result.stderr
    assert "line 4: unknown job NOPE" in result.stderr
    assert "line 5: unknown fields: colour" in result.stderr

    csv_file = tmp_path / "candidates.csv"
    csv_file.write_text("id,name,emails,jobs\nC-5,Eve,eve@e.test;eve@f.test,J1\n"
                        "C-6,Fay,fay@f.test,\n")
    assert "imported 2 candidates" in cli("candidate", "import", str(csv_file)).stdout
    assert cli.json("candidate", "show", "C-5")["emails"] == [  # type: ignore[index]
        "eve@e.test", "eve@f.test"]


def test_explain_prints_the_whole_trace(cli: Cli, tmp_path: Path) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "recruiter@example.com")
    cli("candidate", "add", "C-1", "--name", "Ada", "--email", "ada@applicant.test")
    mail = tmp_path / "msg.eml"
    mail.write_bytes(make_mail("recruiter@example.com", "ada@applicant.test", "Hi"))
    explained = cli.json("explain", str(mail))
    assert isinstance(explained, dict)
    assert (explained["capture"], explained["candidates"], explained["thread"]) == (
        True, ["C-1"], "new")
    assert [t["rule"] for t in explained["trace"]] == [
        "bulk", "direction", "team-scope", "thread-link", "candidate-match", "forward",
        "ats-inbox", "archived-jobs"]
    assert all(t["verdict"] in ("hit", "miss") and t["reasons"] for t in explained["trace"])

    mail.write_bytes(make_mail("someone@else.test", "friend@example.com", "Hi"))
    assert cli.json("explain", str(mail))["capture"] is False  # type: ignore[index]
    text = cli("explain", str(mail)).stdout
    assert "PASS" in text and "team-scope" in text


def test_purge_applies_retention_and_says_what_it_did(cli: Cli, config_file: Path) -> None:
    assert "retention_days is 0" in cli("purge").stderr
    assert cli.json("purge") == {"messages": 0, "threads": 0, "outbox": 0, "cutoff": None,
                                 "scrubbed": True}
    cli("domain", "add", "example.com")
    cli("user", "add", "recruiter@example.com")
    cli("candidate", "add", "C-1", "--name", "Ada", "--email", "ada@applicant.test")

    async def seed() -> None:
        store = Store.open(f"sqlite+aiosqlite:///{config_file.parent}/store/atsmail.db")
        try:
            for subject, days in (("Old", 40), ("New", 0)):
                await capture(store, make_mail("recruiter@example.com", "ada@applicant.test",
                                               subject))
                await captured_days_ago(store, days, subject)
        finally:
            await store.close()

    asyncio.run(seed())
    config_file.write_text(config_file.read_text() + "\n[capture]\nretention_days = 30\n")
    before = datetime.now().astimezone()
    purged = cli.json("purge")
    assert isinstance(purged, dict)
    assert {k: v for k, v in purged.items() if k != "cutoff"} == {
        "messages": 1, "threads": 1, "outbox": 0, "scrubbed": True}
    cutoff = datetime.fromisoformat(purged["cutoff"])
    assert before - timedelta(days=30) <= cutoff <= datetime.now().astimezone() - timedelta(days=30)
    assert [t["subject"] for t in cli.json("threads")] == ["New"]  # type: ignore[union-attr]
    assert "purged 0 messages, 0 threads and 0 outbox messages from before" in cli(
        "purge", "--older-than-days", "1").stdout
    cli("purge", "--older-than-days", "0", code=2)

    async def audited() -> list[tuple[str, object]]:
        store = Store.open(f"sqlite+aiosqlite:///{config_file.parent}/store/atsmail.db")
        try:
            return [(e.actor, e.detail["retention_days"]) for e in await Access(store.db).audit()
                    if e.action == "retention.purge"]
        finally:
            await store.close()

    assert asyncio.run(audited()) == [("cli", 1), ("cli", 30)]


# --- the real process ------------------------------------------------------------


@contextlib.contextmanager
def _serve(cli: Cli, config_file: Path,
           *args: str) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    cli("domain", "add", "example.com")
    cli("user", "add", "recruiter@example.com")
    cli("candidate", "add", "C-1", "--name", "Ada Applicant", "--email", "ada@applicant.test")
    port = int(config_file.read_text().split("127.0.0.1:")[1].split('"')[0])
    log = config_file.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "atsmail", "--config", str(config_file), "serve", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
    try:
        yield process, port, log
    finally:
        workers = _children(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def served(cli: Cli, config_file: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    with _serve(cli, config_file) as served:
        yield served


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_serve_relays_captures_and_stops_cleanly_on_sigterm(
        cli: Cli, config_file: Path, event_loop: str) -> None:
    with _serve(cli, config_file, "--event-loop", event_loop) as served:
        _relay_capture_and_stop(cli, served, config_file)
        output = served[2].read_text()
        assert f"event loop: {event_loop}" in output
        assert "objects made at start kept out of garbage collection" in output


def test_the_schema_is_not_taken_back_under_a_running_gateway(
        cli: Cli, config_file: Path) -> None:
    with _serve(cli, config_file) as (process, _, _):
        holders = _alive_mirrors(config_file)
        assert len(holders) == 1
        refused = cli("schema", "downgrade", "0011", "--yes", code=1).stderr
        assert f"1 gateway(s) run on this store ({holders[0]}): stop every" in refused
        assert cli.json("schema", "show")["store"] == "0012"  # type: ignore[index]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    # Stopped, it leaves no heartbeat behind.
    assert "is at 0011" in cli("schema", "downgrade", "0011", "--yes").stdout


def test_a_heartbeat_left_by_a_killed_gateway_can_be_overridden(cli: Cli,
                                                                config_file: Path) -> None:
    def beat(seconds: float) -> None:
        asyncio.run(_in_store(config_file, lambda store: Mailboxes(store.db).hold(
            "gone-host:1:abc", seconds)))

    beat(60)
    assert "run on this store (gone-host:1:abc)" in cli(
        "schema", "downgrade", "0011", "--yes", code=1).stderr
    assert "is at 0011" in cli("schema", "downgrade", "0011", "--yes", "--force").stdout
    cli("init")
    beat(-1)  # run out
    assert "is at 0011" in cli("schema", "downgrade", "0011", "--yes").stdout


def _alive_mirrors(config_file: Path, timeout: float = 20) -> list[str]:
    """The running mirrors, once there is one."""
    deadline = time.monotonic() + timeout
    while not (found := asyncio.run(_in_store(
            config_file, lambda store: Mailboxes(store.db).alive()))) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def _relay_capture_and_stop(cli: Cli, served: tuple[subprocess.Popen[bytes], int, Path],
                            config_file: Path) -> None:
    process, port, log = served
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.sendmail("recruiter@example.com", ["ada@applicant.test"],
                        make_mail("recruiter@example.com", "ada@applicant.test", "Welcome"))
        client.sendmail("a@example.com", ["b@example.com"],
                        make_mail("a@example.com", "b@example.com", "Internal"))
    threads = cli.json("threads", "--candidate", "C-1")
    assert isinstance(threads, list) and len(threads) == 1
    assert set(threads[0]) >= {"id", "subject", "candidates", "message_count", "last_date"}
    shown = cli.json("thread", "show", str(threads[0]["id"]))
    assert isinstance(shown, dict)
    assert shown["candidates"] == ["C-1"]
    assert [{k: m[k] for k in ("direction", "source", "from", "to", "cc", "subject")}
            for m in shown["messages"]] == [
        {"direction": "outbound", "source": "relay", "from": "recruiter@example.com",
         "to": ["ada@applicant.test"], "cc": [], "subject": "Welcome"}]
    assert len(list((config_file.parent / "delivered" / "new").iterdir())) == 2

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    output = log.read_text()
    assert "stopped" in output and "Traceback" not in output
    assert '"verdict": "capture"' in output and '"verdict": "pass"' in output


def test_a_second_serve_on_a_taken_port_fails_clearly(
        cli: Cli, served: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    for workers in ("1", "2"):
        result = cli("serve", "--workers", workers, code=1)
        assert "cannot start" in result.stderr
        assert "address already in use" in result.stderr.lower()
    assert served[0].poll() is None


def test_serve_with_workers_refuses_a_port_its_like_already_holds(
        cli: Cli, served_by_workers: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    # SO_REUSEPORT alone would let the second share the port unnoticed.
    result = cli("serve", "--workers", "2", code=1)
    assert "address already in use" in result.stderr.lower()
    assert served_by_workers[0].poll() is None


def test_serve_refuses_a_webhook_whose_secret_is_not_set(
        cli: Cli, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATSMAIL_TEST_UNSET_SECRET", raising=False)
    config_file.write_text(config_file.read_text() + "\n[[webhook]]\n"
                           "url = 'https://ats.test/hooks'\n"
                           "secret_env = 'ATSMAIL_TEST_UNSET_SECRET'\n")
    result = cli("serve", code=1)
    assert "webhook[0].secret_env" in result.stderr
    assert "ATSMAIL_TEST_UNSET_SECRET" in result.stderr and "not set" in result.stderr


def test_config_example_is_complete_and_valid(tmp_path: Path) -> None:
    from atsmail.config import load_config
    example = Path(__file__).parent.parent / "config.example.toml"
    config = load_config(example)
    assert config.relay.upstream.kind == "maildir"
    assert config.mirror.enabled and config.secrets.key_file.name == "atsmail.key"
    assert config.mirror.lease == 25
    assert config.oauth.gmail.token_url == "https://oauth2.googleapis.com/token"
    assert config.oauth.outlook.token_url.startswith("https://login.microsoftonline.com/")


def test_mailbox_commands(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("user", "add", "rita@example.com")
    cli("user", "add", "sam@example.com")
    monkeypatch.setenv("BOX_PW", "s3cret-password")
    base = ["mailbox", "connect", "--provider", "imap", "--imap", "127.0.0.1:1143",
            "--security", "none", "--password-env", "BOX_PW"]
    cli(*base, "rita@example.com", "--owner", "rita@example.com")
    again = cli(*base, "rita@example.com", "--owner", "sam@example.com", code=1)
    assert "already connected by rita@example.com" in again.stderr
    cli(*base, "jobs@example.com", "--shared", "--visible-to", "rita@example.com",
        "--visible-to", "sam@example.com")
    shared_again = cli(*base, "jobs@example.com", "--shared", "--visible-to", "sam@example.com",
                       code=1)
    assert "already connected as a shared mailbox" in shared_again.stderr
    assert "not a team member" in cli(*base, "x@example.com", "--owner", "nobody@example.com",
                                      code=1).stderr
    cli(*base, "y@example.com", code=2)  # neither --owner nor --shared
    cli("mailbox", "connect", "--provider", "imap", "z@example.com", "--owner",
        "rita@example.com", "--password-env", "BOX_PW", code=2)  # imap needs --imap
    monkeypatch.delenv("BOX_PW")
    assert "is empty or not set" in cli(*base, "w@example.com", "--owner", "sam@example.com",
                                        code=1).stderr

    listed = cli.json("mailbox", "list")
    assert isinstance(listed, list)
    assert [(m["address"], m["owner"], m["shared"], m["visible_to"], m["state"])
            for m in listed] == [
        ("jobs@example.com", None, True, ["rita@example.com", "sam@example.com"], "connecting"),
        ("rita@example.com", "rita@example.com", False, [], "connecting")]
    assert all({"provider", "last_sync", "last_error"} <= set(m) for m in listed)
    assert b"s3cret-password" not in (tmp_path / "store" / "atsmail.db").read_bytes()

    assert cli.json("mailbox", "folders", "rita@example.com") == []
    assert "has no folder" in cli("mailbox", "set-role", "rita@example.com", "Work",
                                  "incoming", code=1).stderr
    refused = cli("mailbox", "disconnect", "rita@example.com", code=1)
    assert "no hosted identity" in refused.stderr
    cli("identity", "hosted", "rita@example.com", "rita@ats-hosted.example")
    assert "already the hosted identity" in cli(
        "identity", "hosted", "sam@example.com", "rita@ats-hosted.example", code=1).stderr
    cli("mailbox", "disconnect", "rita@example.com")
    cli("mailbox", "disconnect", "jobs@example.com")
    states = {m["address"]: m["state"] for m in cli.json("mailbox", "list")}  # type: ignore[union-attr]
    assert states == {"jobs@example.com": "disconnected", "rita@example.com": "disconnected"}
    # A disconnected mailbox can be connected again.
    monkeypatch.setenv("BOX_PW", "another")
    cli(*base, "rita@example.com", "--owner", "rita@example.com")


def test_send_queues_in_the_outbox(cli: Cli, tmp_path: Path) -> None:
    cli("user", "add", "rita@example.com", "--name", "Rita")
    cli("candidate", "add", "C-1", "--name", "Ada", "--email", "ada@applicant.test")
    no_route = cli("send", "--as", "rita@example.com", "--to", "ada@applicant.test",
                   "--subject", "Hi", "--body", "Hello", code=1)
    assert "no connected mailbox and no hosted identity" in no_route.stderr
    cli("identity", "hosted", "rita@example.com", "rita@ats.example")
    cli("send", "--as", "rita@example.com", "--to", "ada@applicant.test", "--subject", "Hi",
        code=2)  # no body
    assert "unknown candidate" in cli(
        "send", "--as", "rita@example.com", "--to", "ada@applicant.test", "--subject", "Hi",
        "--body", "Hello", "--candidate", "C-9", code=1).stderr
    assert "unknown thread 7" in cli(
        "send", "--as", "rita@example.com", "--to", "ada@applicant.test", "--subject", "Hi",
        "--body", "Hello", "--thread", "7", code=1).stderr
    assert "no mailbox jobs@example.com is connected" in cli(
        "send", "--as", "rita@example.com", "--to", "ada@applicant.test", "--subject", "Hi",
        "--body", "Hello", "--from", "jobs@example.com", code=1).stderr
    body = tmp_path / "body.txt"
    body.write_text("Dear Ada,\n\nwelcome.\n")
    queued = cli.json("send", "--as", "rita@example.com", "--to", "ada@applicant.test",
                      "--subject", "Welcome", "--body-file", str(body), "--candidate", "C-1")
    assert isinstance(queued, dict)
    assert set(queued) == {"id", "message_id", "status"} and queued["status"] == "queued"
    assert queued["message_id"].endswith("@ats.example")
    listed = cli.json("outbox")
    assert isinstance(listed, list)
    assert [{k: m[k] for k in ("id", "message_id", "status", "attempts", "last_error")}
            for m in listed] == [{"id": queued["id"], "message_id": queued["message_id"],
                                  "status": "queued", "attempts": 0, "last_error": None}]


def test_reading_as_a_team_member(cli: Cli) -> None:
    cli("user", "add", "rita@example.com", "--name", "Rita")
    assert "not a team member" in cli("threads", "--as", "nobody@example.com", code=1).stderr
    assert cli.json("threads", "--as", "rita@example.com") == []
    assert "unknown thread 3" in cli("thread", "show", "3", "--as", "rita@example.com",
                                     code=1).stderr
    assert "no mailbox rita@example.com is connected" in cli(
        "mailbox", "set-sharing", "rita@example.com", "subject", code=1).stderr
    cli("mailbox", "set-sharing", "rita@example.com", "secret", code=2)


def test_mailbox_connect_with_a_refresh_token(cli: Cli, config_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cli("user", "add", "rita@example.com")
    cli("user", "add", "sam@example.com")
    monkeypatch.setenv("RITA_TOKEN", "1//refresh-token-of-rita")
    gmail = ["mailbox", "connect", "rita@example.com", "--provider", "gmail", "--owner",
             "rita@example.com"]
    missing = cli(*gmail, "--refresh-token-env", "RITA_TOKEN", code=1)
    assert "no OAuth2 client for gmail: set [oauth.gmail] client_id" in missing.stderr
    assert str(config_file) in missing.stderr and "Traceback" not in missing.output
    cli("mailbox", "connect", "x@example.com", "--provider", "imap", "--imap", "h.test:993",
        "--owner", "sam@example.com", "--refresh-token-env", "RITA_TOKEN", code=2)
    cli(*gmail, "--refresh-token-env", "RITA_TOKEN", "--password-env", "RITA_TOKEN", code=2)

    config_file.write_text(config_file.read_text() + """
[oauth.gmail]
client_id = "1234.apps.googleusercontent.com"
client_secret_env = "GMAIL_CLIENT_SECRET"

[oauth.outlook]
client_id = "00000000-0000-0000-0000-000000000000"
""")
    cli(*gmail, "--refresh-token-env", "RITA_TOKEN")
    token_file = tmp_path / "sam.token"
    token_file.write_text("M.C5-refresh-token-of-sam\n")
    cli("mailbox", "connect", "sam@example.com", "--provider", "outlook", "--owner",
        "sam@example.com", "--refresh-token-file", str(token_file))
    cli("mailbox", "connect", "jobs@example.com", "--provider", "outlook", "--shared",
        "--visible-to", "sam@example.com", "--password-env", "RITA_TOKEN")
    listed = cli.json("mailbox", "list")
    assert isinstance(listed, list)
    assert [{k: m[k] for k in ("address", "auth", "imap", "security", "smtp", "smtp_security")}
            for m in listed] == [
        {"address": "jobs@example.com", "auth": "password",
         "imap": "outlook.office365.com:993", "security": "ssl",
         "smtp": "smtp.office365.com:587", "smtp_security": "starttls"},
        {"address": "rita@example.com", "auth": "oauth2", "imap": "imap.gmail.com:993",
         "security": "ssl", "smtp": "smtp.gmail.com:465", "smtp_security": "ssl"},
        {"address": "sam@example.com", "auth": "oauth2", "imap": "outlook.office365.com:993",
         "security": "ssl", "smtp": "smtp.office365.com:587", "smtp_security": "starttls"}]
    stored = (tmp_path / "store" / "atsmail.db").read_bytes()
    assert b"refresh-token-of-rita" not in stored and b"refresh-token-of-sam" not in stored


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _serving(pids: set[int], port: int) -> dict[int, int]:
    """How many established relay connections each process holds."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                established.add(fields[9])
    held: dict[int, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in established:
                held[pid] = held.get(pid, 0) + 1
    return held


def _wait_for(check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def served_by_workers(cli: Cli, config_file: Path) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                       int, Path]]:
    with _serve(cli, config_file, "--workers", "3") as served:
        yield served


def test_serve_with_workers_shares_the_port_restarts_a_dead_worker_and_stops_them_all(
        cli: Cli, served_by_workers: tuple[subprocess.Popen[bytes], int, Path],
        config_file: Path) -> None:
    process, port, log = served_by_workers
    _wait_for(lambda: len(_children(process.pid)) == 2)
    workers = _children(process.pid)

    # Many clients at once, each sending a candidate mail: every one is
    # delivered and captured once, whichever process took it.
    clients = [smtplib.SMTP("127.0.0.1", port, timeout=20) for _ in range(24)]
    for client in clients:
        client.ehlo()
    held = _serving({process.pid, *workers}, port)
    assert sum(held.values()) == 24
    for i, client in enumerate(clients):
        client.sendmail("recruiter@example.com", ["ada@applicant.test"],
                        make_mail("recruiter@example.com", "ada@applicant.test", f"Mail {i}"))
        client.quit()
    threads = cli.json("threads", "--candidate", "C-1")
    assert isinstance(threads, list)
    assert sorted(t["subject"] for t in threads) == sorted(f"Mail {i}" for i in range(24))
    assert len(list((config_file.parent / "delivered" / "new").iterdir())) == 24

    # A worker killed outright is replaced, and the port keeps serving.
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: len(_children(process.pid) - {victim}) == 2 and victim not in
              _children(process.pid))
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.sendmail("recruiter@example.com", ["ada@applicant.test"],
                        make_mail("recruiter@example.com", "ada@applicant.test", "After"))

    # SIGTERM to the gateway stops every process cleanly.
    workers = _children(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    _wait_for(lambda: not any(_alive(pid) for pid in workers))
    output = log.read_text()
    assert f"relay worker {victim} exited with -9" in output
    assert "Traceback" not in output
    assert len(held) >= 2, held


def test_workers_stop_when_the_main_process_is_killed(
        cli: Cli, served_by_workers: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    process, port, _ = served_by_workers
    _wait_for(lambda: len(_children(process.pid)) == 2)
    workers = _children(process.pid)
    process.kill()
    process.wait()
    # They let go of the port, so the gateway can be started again.
    _wait_for(lambda: not any(_alive(pid) for pid in workers), seconds=10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
