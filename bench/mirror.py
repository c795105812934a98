"""Time the IMAP mirror's first sync of a big mailbox beside a bare aioimaplib fetch.

Why: when a mailbox is connected, the mirror reads the back-fill window of
its incoming folder header by header, asks the rules about each message,
fetches and captures the candidate mail whole, and moves its checkpoint
along. Issue 3 ("Speed") asks that this first sync of a 10,000-message
folder take no more than 1.5x what a bare aioimaplib client needs to fetch
the same header fields from the same server. This script measures both in
one bounded run on loopback that stops by itself.

How, all in this one process (its peak RSS is reset before each phase with
`/proc/self/clear_refs` and read back as VmHWM after it):

1. A real Dovecot is started with `tests/dovecot.py` (Debian package
   `dovecot-imapd`). Its user's INBOX is filled by writing Maildir files
   straight into the user's maildir (owned by uid/gid 65534, the file's
   mtime being the INTERNALDATE, all within the last 13 days so the 14-day
   back-fill takes every one), followed by `doveadm force-resync`, which
   indexes them. About 1 % are candidate mail (from one of `--candidates`
   candidate addresses seeded into the store); the rest is company mail:
   colleagues at the internal domain, outside business contacts and
   newsletters (List-Id, List-Unsubscribe). The header fields are then
   fetched once, untimed, so both timed runs find Dovecot's cache warm.
2. Bare: aioimaplib login, SELECT INBOX, UID SEARCH ALL, then UID FETCH of
   the mirror's header fields (`atsmail.gateway.mirror.HEADERS`) in batches
   of `atsmail.gateway.mirror.BATCH` UIDs, one batch after another, as the
   mirror does. Nothing is parsed beyond counting the literals.
3. Mirror: an SQLite store in a temporary directory (migrated, seeded with
   the internal domain, the mailbox's owner, a job and the candidates), the
   mailbox connected with its password sealed by a fresh key file, then a
   `Gateway` started with the mirror on. The clock runs from just before
   `Gateway.start()` until the INBOX checkpoint (`Mailboxes.folders`) holds
   the highest UID, polled every `POLL` seconds. The store must then hold
   exactly the candidate messages (by Message-ID), or the exit status is 1.
4. Steps 2 and 3 take turns `--rounds` times (default 3), each mirror run
   with a fresh store; the table shows medians and the range, the ratio is
   median mirror / median bare. Taking turns means a busy neighbour on the
   machine slows both alike; the range shows how steady the run was.

`--breakdown` wraps what the mirror's watcher awaits or calls (IMAP
commands, `Database.run` by the function it runs, checkpoints, the capture
writer, `read_message`, `decide`) and prints where its wall time went.

`--py-spy FILE` (py-spy must be on the PATH) records this process during
the first round's mirror run (`--nonblocking`; only the thread holding the
GIL is sampled, so the profile shows where Python's time goes, not
SQLite's): FILE.svg is a flame graph, FILE.txt folded stacks, FILE.json
speedscope.

Usage:

    python bench/mirror.py [--messages N] [--rounds R] [--candidates K]
                           [--share FRACTION] [--timeout SECONDS] [--breakdown]
                           [--py-spy FILE] [--keep] [--verbose]

Run as root (Dovecot's mail processes run as uid 65534) from a checkout with
`pip install -e .`. A default run takes about two minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aioimaplib  # noqa: E402
from sqlalchemy import select  # noqa: E402

from atsmail.config import (  # noqa: E402
    CaptureConfig,
    Config,
    MirrorConfig,
    RelayConfig,
    SecretsConfig,
    StorageConfig,
    Upstream,
)
from atsmail.gateway.mirror import BATCH, HEADERS, START  # noqa: E402
from atsmail.gateway.server import Gateway  # noqa: E402
from atsmail.secrets import Secrets, create_key_file  # noqa: E402
from atsmail.storage import Store  # noqa: E402
from atsmail.storage.mailboxes import Account, Mailboxes  # noqa: E402
from atsmail.storage.models import CapturedMessage  # noqa: E402
from tests.dovecot import MAIL_GID, MAIL_UID, Dovecot, start_dovecot  # noqa: E402

HOST = "127.0.0.1"
# tests/dovecot.py names its users NAME<n>@example.com.
INTERNAL_DOMAIN = "example.com"
OWNER = "recruiter@example.com"
JOB_ID = "bench-job"
# How often the mirror's checkpoint is looked at while it syncs.
POLL = 0.1
GOAL = 1.5
log = logging.getLogger("bench.mirror")


def candidate_address(n: int) -> str:
    return f"candidate{n}@candidates.test"


# --- the mailbox's content ------------------------------------------------------


@dataclass(frozen=True)
class Mail:
    raw: bytes
    when: float
    message_id: str
    candidate: bool


_WORDS = ("quarterly", "roadmap", "invoice", "meeting", "review", "offer", "team", "budget",
          "release", "customer", "schedule", "notes", "draft", "update", "follow-up", "plan",
          "interview", "contract", "design", "feedback", "deadline", "project", "report")


def _text(rng: random.Random, size: int) -> str:
    lines, length = [], 0
    while length < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 14))).capitalize()
        lines.append(line + ".")
        length += len(line) + 2
    return "\n".join(lines) + "\n"


def _received(rng: random.Random, when: datetime) -> list[str]:
    hops = []
    for hop in range(rng.randint(2, 4)):
        stamp = format_datetime(when - timedelta(seconds=hop * 3))
        hops.append(f"Received: from mx{hop}.relay.test (mx{hop}.relay.test "
                    f"[192.0.2.{rng.randint(1, 254)}])\n\tby mail.example.com (Postfix) with "
                    f"ESMTPS id {rng.getrandbits(40):010X}\n\tfor <inbox>; {stamp}")
    return hops


def make_mails(count: int, owner_box: str, share: float, candidates: int,
               seed: int = 3) -> Iterator[Mail]:
    """`count` messages to `owner_box`, oldest first; about `share` of them candidate mail."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    start = now - timedelta(days=13)
    step = (now - timedelta(minutes=5) - start) / max(count, 1)
    wanted = max(1, round(count * share)) if share > 0 else 0
    candidate_at = set(rng.sample(range(count), min(wanted, count)))
    colleagues = [f"colleague{n}@{INTERNAL_DOMAIN}" for n in range(40)]
    contacts = [f"{name}@{org}.test" for name in ("sales", "support", "anna", "bob", "billing")
                for org in ("supplier", "partner", "lawfirm", "agency", "bank")]
    lists = [("news", "shop"), ("digest", "technews"), ("offers", "travel"), ("weekly", "saas")]
    earlier: list[str] = []
    for i in range(count):
        when = start + step * i
        message_id = f"bench.{i}.{rng.getrandbits(48):012x}@mail.test"
        headers = _received(rng, when)
        body_size = rng.randint(600, 3000)
        is_candidate = i in candidate_at
        kind = "candidate" if is_candidate else rng.choice(
            ("colleague", "colleague", "contact", "newsletter", "newsletter"))
        if kind == "candidate":
            n = rng.randrange(candidates)
            headers += [f"From: Candidate {n} <{candidate_address(n)}>",
                        f"To: <{owner_box}>",
                        f"Subject: Application {i}: {rng.choice(_WORDS)} engineer"]
        elif kind == "colleague":
            cc = rng.sample(colleagues, rng.randint(0, 3))
            headers += [f"From: {rng.choice(colleagues)}", f"To: {owner_box}"]
            if cc:
                headers.append(f"Cc: {', '.join(cc)}")
            headers.append(f"Subject: {rng.choice(_WORDS)} {rng.choice(_WORDS)} {i}")
            if earlier and rng.random() < 0.4:
                parent = rng.choice(earlier)
                headers += [f"In-Reply-To: <{parent}>", f"References: <{parent}>"]
        elif kind == "contact":
            headers += [f"From: {rng.choice(contacts)}", f"To: {owner_box}",
                        f"Subject: Re: {rng.choice(_WORDS)} {i}"]
        else:
            name, org = rng.choice(lists)
            headers += [f"From: {name.title()} <{name}@{org}.test>", f"To: {owner_box}",
                        f"Subject: This week at {org} #{i}", f"List-Id: <{name}.{org}.test>",
                        f"List-Unsubscribe: <https://{org}.test/unsubscribe/{i}>",
                        "Precedence: bulk"]
            body_size *= 4
        headers += [f"Date: {format_datetime(when)}", f"Message-ID: <{message_id}>",
                    "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                    "Content-Transfer-Encoding: 8bit"]
        raw = ("\n".join(headers) + "\n\n" + _text(rng, body_size)).encode()
        if kind == "colleague":
            earlier.append(message_id)
        yield Mail(raw, when.timestamp(), message_id, is_candidate)


def fill_maildir(dovecot: Dovecot, address: str, mails: Iterator[Mail]) -> tuple[int, set[str]]:
    """Write `mails` into the user's INBOX, let Dovecot index them; (count, candidate ids)."""
    maildir = dovecot.root / "mail" / address
    for sub in ("", "cur", "new", "tmp"):
        (maildir / sub).mkdir(exist_ok=True)
    count, candidate_ids, pid = 0, set(), os.getpid()
    for n, mail in enumerate(mails):
        # Maildir's unique name; S= and W= spare Dovecot reading the sizes.
        virtual = len(mail.raw) + mail.raw.count(b"\n")  # with CRLF line ends
        name = f"{int(mail.when)}.M{n:06d}P{pid}.bench,S={len(mail.raw)},W={virtual}:2,"
        path = maildir / "cur" / name
        path.write_bytes(mail.raw)
        os.utime(path, (mail.when, mail.when))  # the INTERNALDATE
        count += 1
        if mail.candidate:
            candidate_ids.add(mail.message_id)
    for directory, _, files in os.walk(maildir):
        os.chown(directory, MAIL_UID, MAIL_GID)
        for file in files:
            os.chown(os.path.join(directory, file), MAIL_UID, MAIL_GID)
    subprocess.run(["doveadm", "-c", str(dovecot.root / "dovecot.conf"), "force-resync",
                    "-u", address, "INBOX"], check=True, capture_output=True, timeout=300)
    return count, candidate_ids


# --- measuring ------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each phase shows its own peak."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as out:
        out.write("5")


def peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) so far."""
    times = os.times()
    return times.user + times.system


@dataclass
class Timing:
    seconds: float
    cpu: float
    rss_mib: float | None


@dataclass
class Row:
    name: str
    messages: int
    runs: list[Timing]

    def median(self, attr: str) -> float:
        return float(statistics.median(float(getattr(t, attr)) for t in self.runs))

    def cells(self) -> list[str]:
        seconds = [t.seconds for t in self.runs]
        rss = [t.rss_mib for t in self.runs if t.rss_mib is not None]
        return [self.name, str(len(self.runs)), str(self.messages),
                f"{self.median('seconds'):.2f}", f"{min(seconds):.2f}-{max(seconds):.2f}",
                f"{self.messages / self.median('seconds'):.0f}", f"{self.median('cpu'):.2f}",
                f"{max(rss):.1f}" if rss else "-"]


@contextlib.contextmanager
def measured(row: Row) -> Iterator[Timing]:
    """Time the block into a new run of `row`; the block may correct `seconds`."""
    reset_peak_rss()
    cpu, started = cpu_seconds(), time.perf_counter()
    timing = Timing(0.0, 0.0, None)
    yield timing
    elapsed = time.perf_counter() - started
    timing.seconds = timing.seconds or elapsed
    timing.cpu, timing.rss_mib = cpu_seconds() - cpu, peak_rss_mib()
    row.runs.append(timing)


def _check(response: Any, what: str) -> list[Any]:
    if response.result != "OK":
        raise SystemExit(f"bare client: {what} failed: {response.lines!r}")
    return list(response.lines)


async def bare_fetch(port: int, address: str, password: str, command_timeout: float) -> list[int]:
    """Login, SELECT, UID SEARCH ALL, then the mirror's header fetch batch by batch.

    Returns the UIDs whose headers came back.
    """
    client = aioimaplib.IMAP4(HOST, port, timeout=command_timeout)
    await client.wait_hello_from_server()
    try:
        _check(await client.login(address, password), "LOGIN")
        _check(await client.select("INBOX"), "SELECT")
        lines = _check(await client.uid_search("ALL", charset=None), "UID SEARCH")
        uids = sorted(int(n) for n in bytes(lines[0]).split() if n.isdigit()) if lines else []
        fetched = 0
        for start in range(0, len(uids), BATCH):
            batch = ",".join(str(u) for u in uids[start:start + BATCH])
            lines = _check(await client.uid("fetch", batch, f"(UID {HEADERS})"), "UID FETCH")
            fetched += sum(isinstance(line, bytearray) for line in lines)
        if fetched != len(uids):
            raise SystemExit(f"bare client: {fetched} headers for {len(uids)} UIDs")
        return uids
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.logout(), 5)


async def seed_store(url: str, secrets: SecretsConfig, dovecot: Dovecot, address: str,
                     password: str, candidates: int) -> None:
    store = Store.open(url)
    try:
        await store.migrate()
        await store.add_domain(INTERNAL_DOMAIN)
        await store.add_team_member(OWNER, "Rita Recruiter", "recruiter")
        await store.add_job(JOB_ID, "Benchmark engineer")
        for n in range(candidates):
            await store.add_candidate(f"C-{n}", f"Candidate {n}", [candidate_address(n)],
                                      [JOB_ID])
        await Mailboxes(store.db).connect(Account(
            address=address, provider="imap", owner=OWNER, shared=False, visible_to=[],
            imap_host=HOST, imap_port=dovecot.port, smtp_host="", smtp_port=0,
            security="none", username=address, sealed_secret=Secrets.load(secrets).seal(password)))
    finally:
        await store.close()


def gateway_config(url: str, secrets: SecretsConfig) -> Config:
    return Config(
        storage=StorageConfig(url),
        # The relay listens on a free port; nothing is relayed in this run.
        relay=RelayConfig(listen_host=HOST, listen_port=0,
                          upstream=Upstream("smtp", HOST, 9), upstream_timeout=5),
        capture=CaptureConfig(),
        secrets=secrets,
        mirror=MirrorConfig(enabled=True, poll_interval=60, command_timeout=30,
                            reconnect_max=5),
    )


async def mirror_sync(config: Config, address: str, last_uid: int,
                      within: float) -> tuple[float, float]:
    """Start a gateway, wait for the INBOX checkpoint to reach `last_uid`.

    Returns (seconds until then, seconds of them spent in Gateway.start).
    """
    started = time.perf_counter()
    gateway = Gateway(config)
    try:
        await gateway.start()
        start_seconds = time.perf_counter() - started
        mailboxes = Mailboxes(gateway.store.db)
        deadline = started + within
        while True:
            inbox = next((f for f in await mailboxes.folders(address) if f.name == "INBOX"),
                         None)
            if inbox is not None and inbox.uidvalidity is not None and inbox.last_uid >= last_uid:
                return time.perf_counter() - started, start_seconds
            if time.perf_counter() > deadline:
                box = await mailboxes.get(address)
                raise SystemExit(f"the mirror did not reach UID {last_uid} in {within:.0f} s: "
                                 f"checkpoint {inbox.last_uid if inbox else None}, state "
                                 f"{box.state}, last error {box.last_error!r}")
            await asyncio.sleep(POLL)
    finally:
        await gateway.stop(grace=1)


async def captured_ids(url: str) -> list[str]:
    """The Message-IDs of the messages the store holds (captured, any state)."""
    store = Store.open(url)
    try:
        return await store.db.run(
            lambda conn: [m for m in conn.scalars(select(CapturedMessage.message_id)) if m],
            write=False)
    finally:
        await store.close()


@contextlib.contextmanager
def py_spy(output: Path | None) -> Iterator[None]:
    """Record this process with py-spy while the block runs (when asked)."""
    if output is None:
        yield
        return
    formats = {".svg": "flamegraph", ".txt": "raw", ".json": "speedscope"}
    fmt = formats.get(output.suffix)
    if fmt is None:
        raise SystemExit(f"--py-spy FILE must end in one of {', '.join(formats)}")
    process = subprocess.Popen(
        ["py-spy", "record", "--pid", str(os.getpid()), "--rate", "250", "--nonblocking", "--gil",
         "--format", fmt, "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach before the clock starts
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        if process.returncode not in (0, -signal.SIGINT):
            print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        else:
            print(f"mirror profile written to {output}")


# --- the run --------------------------------------------------------------------


class Breakdown:
    """Where the mirror's wall time goes, by wrapping what its watcher awaits or calls.

    The watcher does one thing at a time, so the parts add up to (nearly) its
    whole sync; the rest is the event loop and the code between the calls.
    Only installed with --breakdown: the wrappers cost a little time.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        # Only calls made while a mirror run is timed are counted.
        self.active = False

    def _record(self, key: str, started: float) -> None:
        if not self.active:
            return
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
        self.calls[key] += 1

    def wrap_async(self, owner: Any, name: str, key: Callable[..., str]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            print(f"--breakdown: {owner.__name__}.{name} is gone, not timed", file=sys.stderr)
            return

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self._record(key(*args, **kwargs), started)

        setattr(owner, name, timed)

    def wrap_sync(self, owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            print(f"--breakdown: {owner.__name__}.{name} is gone, not timed", file=sys.stderr)
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._record(key, started)

        setattr(owner, name, timed)

    def install(self) -> None:
        from atsmail.gateway import mirror
        from atsmail.gateway.imap import ImapSession
        from atsmail.storage.capture import CaptureWriter
        from atsmail.storage.db import Database
        from atsmail.storage.lookup import load_directory

        def fetch_key(session: Any, uids: Sequence[int], part: str) -> str:
            if part == HEADERS:
                return "IMAP UID FETCH headers (per batch)"
            if part == START:
                return "IMAP UID FETCH starts (per batch with mail its header leaves open)"
            return "IMAP UID FETCH whole messages (per batch with candidates)"

        def run_key(db: Any, work: Any, write: bool, **options: Any) -> str:
            if work is load_directory:
                return "store: load_directory (per pass)"
            if "_context" in getattr(work, "__qualname__", ""):
                return "store: context_for_many (per batch with mail not vetoed)"
            if "checkpoint" in getattr(work, "__qualname__", ""):
                return "store: the checkpoint's transaction (not the watcher's own; not added up)"
            return "store: capture writer, sender (not the watcher's; not added up)"

        self.wrap_async(ImapSession, "fetch", fetch_key)
        for name in ("select", "search", "folders", "capabilities"):
            self.wrap_async(ImapSession, name, lambda *a, **k: "IMAP SELECT, SEARCH, LIST")
        self.wrap_async(ImapSession, "open", lambda *a, **k: "IMAP connect and LOGIN")
        self.wrap_async(Database, "run", run_key)
        self.wrap_async(Mailboxes, "checkpoint",
                        lambda *a, **k: "store: captures + checkpoint, one commit (per batch)")
        for name in ("set_state", "set_synced", "record_folders"):
            self.wrap_async(Mailboxes, name, lambda *a, **k: "store: mailbox state, folders")
        for name in ("prepare", "confirm"):
            self.wrap_async(CaptureWriter, name,
                            lambda *a, **k: "capture: prepare + confirm (per candidate)")
        self.wrap_sync(mirror, "passed_over", "rules: prefilter (raw header bytes)")
        self.wrap_sync(mirror, "read_message", "rules: read_message (parse headers)")
        self.wrap_sync(mirror, "might_forward", "rules: signs of a forward (starts)")
        self.wrap_sync(mirror, "decide", "rules: decide")

    def print(self, total: float) -> None:
        print(f"\nwhere the mirror's time went (summed over its runs, {total:.2f} s in all):")
        watcher = 0.0
        for key, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {seconds:7.2f} s  {100 * seconds / total:5.1f} %  "
                  f"{self.calls[key]:7d} calls  {key}")
            if "not the watcher" not in key:
                watcher += seconds
        print(f"  {total - watcher:7.2f} s  {100 * (total - watcher) / total:5.1f} %"
              f"           the rest (event loop, the watcher's own code, start-up)")


def print_table(rows: list[Row]) -> None:
    header = ["run", "runs", "messages", "median s", "min-max s", "msg/s", "CPU s",
              "peak RSS MiB"]
    cells = [header] + [row.cells() for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for n, line in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def check_capture(captured: list[str], expected: set[str]) -> bool:
    unexpected, missing = set(captured) - expected, expected - set(captured)
    duplicates = len(captured) - len(set(captured))
    if unexpected or missing or duplicates:
        print(f"capture MISMATCH: {len(captured)} captured, {len(expected)} expected; missing "
              f"{sorted(missing)[:3]} ({len(missing)}), unexpected {sorted(unexpected)[:3]} "
              f"({len(unexpected)}), duplicates {duplicates}", file=sys.stderr)
        return False
    return True


async def run(opts: argparse.Namespace, workdir: Path, dovecot: Dovecot) -> int:
    address, password = dovecot.add_user("bench")

    began = time.perf_counter()
    count, candidate_ids = await asyncio.to_thread(
        fill_maildir, dovecot, address,
        make_mails(opts.messages, address, opts.share, opts.candidates))
    print(f"filled {address}'s INBOX with {count} messages ({len(candidate_ids)} candidate "
          f"mail) in {time.perf_counter() - began:.1f} s", flush=True)

    began = time.perf_counter()
    uids = await bare_fetch(dovecot.port, address, password, opts.timeout)
    print(f"warm-up fetch (not counted): {time.perf_counter() - began:.2f} s", flush=True)
    if len(uids) != count:
        raise SystemExit(f"Dovecot shows {len(uids)} messages, {count} were written")

    secrets = SecretsConfig(key_file=workdir / "atsmail.key", key_env="ATSMAIL_BENCH_NO_KEY")
    create_key_file(secrets)
    breakdown = Breakdown() if opts.breakdown else None
    if breakdown is not None:
        breakdown.install()
    bare = Row("bare aioimaplib fetch", len(uids), [])
    mirror = Row("atsmail mirror first sync", len(uids), [])
    start_seconds: list[float] = []
    ok = True
    # Bare and mirror take turns, so a busy neighbour slows both alike.
    for round_ in range(1, opts.rounds + 1):
        with measured(bare):
            await asyncio.wait_for(bare_fetch(dovecot.port, address, password, opts.timeout),
                                   opts.timeout)
        url = f"sqlite+aiosqlite:///{workdir}/atsmail-{round_}.db"
        await seed_store(url, secrets, dovecot, address, password, opts.candidates)
        with py_spy(opts.py_spy if round_ == 1 else None), measured(mirror) as timing:
            if breakdown is not None:
                breakdown.active = True
            timing.seconds, started = await mirror_sync(gateway_config(url, secrets), address,
                                                        uids[-1], opts.timeout)
            if breakdown is not None:
                breakdown.active = False
        start_seconds.append(started)
        ok = check_capture(await captured_ids(url), candidate_ids) and ok
        print(f"round {round_}: bare {bare.runs[-1].seconds:.2f} s, mirror "
              f"{mirror.runs[-1].seconds:.2f} s "
              f"({mirror.runs[-1].seconds / bare.runs[-1].seconds:.2f}x)", flush=True)

    print()
    print_table([bare, mirror])
    ratio = mirror.median("seconds") / bare.median("seconds")
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"\nmirror / bare (medians): {ratio:.2f}x -- goal <= {GOAL}x {verdict}")
    print(f"Gateway.start took {statistics.median(start_seconds):.2f} s of the mirror's time; "
          f"the checkpoint was looked at every {POLL} s")
    print(f"captured: the {len(candidate_ids)} candidate messages "
          f"{'exactly, in every round' if ok else 'NOT exactly (see above)'}")
    if breakdown is not None:
        breakdown.print(sum(t.seconds for t in mirror.runs))
    return 0 if ok else 1


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the mirror's first sync of a big Dovecot INBOX beside a bare "
                    "aioimaplib header fetch.")
    parser.add_argument("--messages", type=int, default=10_000, help="messages in the INBOX")
    parser.add_argument("--share", type=float, default=0.01,
                        help="fraction of the messages that is candidate mail")
    parser.add_argument("--candidates", type=int, default=200,
                        help="candidates seeded into the store")
    parser.add_argument("--rounds", type=int, default=3,
                        help="bare and mirror runs, taking turns; the medians are compared")
    parser.add_argument("--breakdown", action="store_true",
                        help="also show where the mirror's time goes (wraps its calls)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds allowed for each timed run")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="record the mirror phase with py-spy: FILE.svg flame graph, "
                             "FILE.txt folded stacks, FILE.json speedscope")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directories (store, Dovecot root and log)")
    parser.add_argument("--verbose", action="store_true", help="show atsmail's log")
    opts = parser.parse_args(argv)
    if opts.messages < 1 or opts.candidates < 1 or opts.rounds < 1:
        parser.error("--messages, --candidates and --rounds must be at least 1")
    if not 0 <= opts.share <= 1:
        parser.error("--share must be between 0 and 1")
    if opts.timeout <= 0:
        parser.error("--timeout must be positive")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the mail files must belong to Dovecot's uid 65534")
    dovecot = start_dovecot()
    if dovecot is None:
        raise SystemExit("no dovecot on this machine (Debian: dovecot-imapd)")
    workdir = Path(tempfile.mkdtemp(prefix="atsmail-bench-mirror-"))
    try:
        return asyncio.run(run(opts, workdir, dovecot))
    finally:
        dovecot.stop()
        if opts.keep:
            print(f"kept {workdir} and {dovecot.root}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(dovecot.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
