"""How long candidate mail takes from delivery into a mailbox to capture, with many mailboxes.

Why: once mailboxes are connected, the mirror keeps them in sync (IDLE where
the server offers it), and a recruiter expects a candidate's reply on the
candidate's profile within seconds. The goal: with 50 mailboxes on one
Dovecot, each receiving mail, under 5 s from delivery to capture at p99.

How, in one bounded run on loopback:

1. A real Dovecot (`tests/dovecot.py`, Debian package `dovecot-imapd`) with
   `--mailboxes` users; an SQLite store with the internal domain, one team
   member owning each mailbox, a job and `--candidates` candidates; each
   mailbox connected with its password sealed by a fresh key.
2. A `Gateway` starts with the mirror on; the clock starts once every
   mailbox is idle (its first sync done, IDLE or polling in place).
3. `--messages` candidate messages are delivered (IMAP APPEND, as delivery
   into a Maildir through Dovecot would notify) round-robin over the
   mailboxes at `--rate` a second, from two threads; each delivery's time is
   noted when the server has answered the APPEND.
4. The store is read every `POLL` seconds; a message's latency is the first
   read that holds it minus its delivery time (so up to POLL too high).

It prints p50, p95, p99 and the maximum, and exits 1 when a message was not
captured within `--timeout` or the p99 is above `--goal`.

Run as root (Dovecot's mail processes run as uid 65534) from a checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mirror import (  # this folder is not a package
    HOST,
    INTERNAL_DOMAIN,
    JOB_ID,
    candidate_address,
    gateway_config,
)
from sqlalchemy import Connection, select

from atsmail.config import SecretsConfig
from atsmail.gateway.server import Gateway
from atsmail.secrets import Secrets, create_key_file
from atsmail.storage import Store
from atsmail.storage.mailboxes import Account, Mailboxes
from atsmail.storage.models import CapturedMessage
from tests.dovecot import Dovecot, start_dovecot

POLL = 0.05


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def seed(url: str, secrets: SecretsConfig, dovecot: Dovecot, mailboxes: int,
               candidates: int) -> list[tuple[str, str]]:
    """The store, and the connected mailboxes as (address, password)."""
    boxes = [dovecot.add_user("box") for _ in range(mailboxes)]
    seal = Secrets.load(secrets).seal
    store = Store.open(url)
    try:
        await store.migrate()
        await store.add_domain(INTERNAL_DOMAIN)
        await store.add_job(JOB_ID, "Benchmark engineer")
        for n in range(candidates):
            await store.add_candidate(f"C-{n}", f"Candidate {n}", [candidate_address(n)],
                                      [JOB_ID])
        for i, (address, password) in enumerate(boxes):
            owner = f"owner{i}@{INTERNAL_DOMAIN}"
            await store.add_team_member(owner, f"Owner {i}", "recruiter")
            await Mailboxes(store.db).connect(Account(
                address=address, provider="imap", owner=owner, shared=False, visible_to=[],
                imap_host=HOST, imap_port=dovecot.port, smtp_host="", smtp_port=0,
                security="none", username=address, sealed_secret=seal(password)))
    finally:
        await store.close()
    return boxes


def candidate_mail(n: int, candidates: int, to: str) -> tuple[str, bytes]:
    message = EmailMessage()
    message["From"] = candidate_address(n % candidates)
    message["To"] = to
    message["Subject"] = f"Re: your application ({n})"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(f"latency{n}", "candidates.test")
    message.set_content("Thank you, Tuesday works for me.\n")
    return message["Message-ID"].strip("<>"), message.as_bytes()


async def run(opts: argparse.Namespace, workdir: Path, dovecot: Dovecot) -> int:
    secrets = SecretsConfig(key_file=workdir / "atsmail.key")
    create_key_file(secrets)
    url = f"sqlite+aiosqlite:///{workdir}/atsmail.db"
    boxes = await seed(url, secrets, dovecot, opts.mailboxes, opts.candidates)
    gateway = Gateway(gateway_config(url, secrets))
    await gateway.start()
    try:
        mailboxes = Mailboxes(gateway.store.db)
        began = time.monotonic()
        while {m.state for m in await mailboxes.all()} != {"idle"}:
            if time.monotonic() - began > opts.timeout:
                raise SystemExit("the mailboxes did not all become idle")
            await asyncio.sleep(0.2)
        print(f"{opts.mailboxes} mailboxes idle after {time.monotonic() - began:.1f} s; "
              f"delivering {opts.messages} candidate messages at {opts.rate}/s", flush=True)

        delivered: dict[str, float] = {}
        seen: dict[str, float] = {}

        def deliver(n: int) -> None:
            address, password = boxes[n % len(boxes)]
            message_id, raw = candidate_mail(n, opts.candidates, address)
            dovecot.deliver(address, password, raw)
            delivered[message_id] = time.monotonic()

        async def watch() -> None:
            while True:
                now = time.monotonic()
                for message_id in await gateway.store.db.run(captured, write=False):
                    seen.setdefault(message_id, now)
                await asyncio.sleep(POLL)

        watcher = asyncio.create_task(watch())
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            pending = []
            for n in range(opts.messages):
                await asyncio.sleep(max(0.0, start + n / opts.rate - time.monotonic()))
                pending.append(loop.run_in_executor(pool, deliver, n))
            await asyncio.gather(*pending)
        deadline = time.monotonic() + opts.timeout
        while len(seen) < len(delivered) and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
        watcher.cancel()
    finally:
        await gateway.stop(grace=1)

    latencies = [seen[m] - t for m, t in delivered.items() if m in seen]
    missing = len(delivered) - len(latencies)
    p99 = percentile(latencies, 99) if latencies else float("inf")
    print(f"captured {len(latencies)} of {len(delivered)}; delivery to capture: "
          f"p50 {statistics.median(latencies):.2f} s, p95 {percentile(latencies, 95):.2f} s, "
          f"p99 {p99:.2f} s, max {max(latencies):.2f} s (goal: p99 under {opts.goal:g} s)")
    return 0 if not missing and p99 < opts.goal else 1


def captured(conn: Connection) -> list[str]:
    return [m for m in conn.scalars(select(CapturedMessage.message_id)) if m]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=50)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rate", type=float, default=5.0, help="deliveries a second")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--goal", type=float, default=5.0, help="p99 seconds to pass")
    parser.add_argument("--timeout", type=float, default=120.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    dovecot = start_dovecot()
    if dovecot is None:
        raise SystemExit("no dovecot on this machine (Debian: dovecot-imapd)")
    workdir = Path(tempfile.mkdtemp(prefix="atsmail-bench-latency-"))
    try:
        return asyncio.run(run(opts, workdir, dovecot))
    finally:
        dovecot.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(dovecot.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
