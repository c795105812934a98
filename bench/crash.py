"""kill -9 the gateway again and again while a real Postfix relays a load through it.

Why: atsmail answers the end of DATA only after the upstream has answered it
and the capture is committed, and captures idempotently; so when the gateway
dies at any instant, the sending MTA keeps every message it did not get a 250
for and retries it, and every candidate message ends up captured once. This
script checks that claim end to end, on loopback, in one bounded run.

How, in a temporary directory:

- a recording sink (aiosmtpd, a child process of this script) notes the
  Message-ID of every message it accepts;
- `python -m atsmail serve` relays to the sink, on an SQLite store seeded
  with a recruiter, an internal domain and `--candidates` candidates;
- a private Postfix instance (Debian package `postfix`; its own main.cf and
  master.cf, started in the foreground as root, retrying every second)
  accepts the load and relays everything to atsmail as its relayhost;
- the load, from `bench/relay.py`'s generator, sends `--messages` messages
  (every second one candidate mail) to Postfix;
- while Postfix delivers, atsmail is killed with SIGKILL `--kills` times (each
  time the sink has seen another share of the load) and started again.

When Postfix's queue is empty the script checks: every message Postfix took
reached the sink (duplicates, the SMTP-inherent window where the upstream
accepted a message and the gateway died before answering, are counted); every
candidate message is captured exactly once and confirmed; nothing else is
captured. It prints the figures and exits 1 on any loss.

Run as root (Postfix's master must be), e.g. `python bench/crash.py`; CI
runs `python bench/crash.py --messages 2000`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay import (  # this folder is not a package
    HOST,
    LoadResult,
    Processes,
    free_port,
    log_tail,
    run_load,
    seed_store,
    wait_for_port,
    workspace,
    write_relay_config,
)

TAG = "crash"
# Postfix's deliveries to the gateway at once (default_destination_concurrency_limit).
POSTFIX_CONCURRENCY = 20
MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>]*)>", re.IGNORECASE | re.MULTILINE)


# --- the recording sink (a child process) -------------------------------------


def run_recording_sink(port: int, record: Path) -> None:
    from aiosmtpd.smtp import SMTP, Envelope, Session

    out = record.open("ab", buffering=0)

    class Sink:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            found = MESSAGE_ID.search(envelope.original_content or b"")
            out.write((found.group(1) if found else b"-") + b"\n")
            return "250 2.0.0 Ok: recorded"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Sink()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.bench.test"), host=HOST, port=port,
            backlog=512)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


def recorded(record: Path) -> list[str]:
    if not record.exists():
        return []
    return [line for line in record.read_text().splitlines() if line]


# --- a private Postfix --------------------------------------------------------


class Postfix:
    """A Postfix instance of its own: config, queue and log in `root`."""

    SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def __init__(self, root: Path, port: int, relayhost_port: int) -> None:
        self.root = root
        self.port = port
        self.conf = root / "conf"
        self.queue = root / "queue"
        for folder in (self.conf, self.queue, root / "data"):
            folder.mkdir(parents=True, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(root / "data", owner.pw_uid, owner.pw_gid)
        # Its daemons, running as postfix, must reach the queue through here.
        for folder in (root, *root.parents):
            if folder != Path("/"):
                folder.chmod(folder.stat().st_mode | 0o055)
        (self.conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {root / "data"}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {HOST}
inet_protocols = ipv4
myhostname = mta.bench.test
mydestination =
local_transport = error:no local delivery here
mynetworks = 127.0.0.0/8
relayhost = [{HOST}]:{relayhost_port}
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = /dev/stdout
default_process_limit = 200
default_destination_concurrency_limit = {POSTFIX_CONCURRENCY}
# Retry soon and often: the gateway comes back within a second.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 5s
""")
        (self.conf / "master.cf").write_text(
            f"{HOST}:{port} inet n - n - - smtpd\n" + self.SERVICES)

    def start(self, procs: Processes) -> None:
        done = subprocess.run(["postfix", "-c", str(self.conf), "set-permissions"],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"postfix set-permissions failed:\n{done.stdout}{done.stderr}")
        process, log = procs.start("postfix", ["postfix", "-c", str(self.conf), "start-fg"])
        wait_for_port(self.port, process, log)
        self.process = process

    def queued(self) -> int:
        return sum(1 for folder in ("maildrop", "incoming", "active", "deferred", "hold")
                   for _, _, files in os.walk(self.queue / folder) for _ in files)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- the run -------------------------------------------------------------------


def captures(store: Path) -> list[tuple[str, str, int]]:
    """(Message-ID, state, rows) for each Message-ID in the store."""
    with sqlite3.connect(store) as db:
        return list(db.execute("SELECT message_id, state, COUNT(*) FROM messages "
                               "GROUP BY message_id, state"))


def run(opts: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not shutil.which("postfix"):
        raise SystemExit("needs root and Postfix (Debian package postfix): its master "
                         "process starts as root")
    # A SIGTERM (a timeout, say) still stops Postfix and the rest on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    with workspace(opts.keep) as workdir:
        procs = Processes(workdir)
        postfix: Postfix | None = None
        try:
            sink_port, relay_port, mta_port = free_port(), free_port(), free_port()
            record = workdir / "sink.ids"
            sink, sink_log = procs.start("sink", this_script_here("_sink", sink_port, record))
            wait_for_port(sink_port, sink, sink_log)

            config = write_relay_config(workdir, relay_port, sink_port)
            atsmail = [sys.executable, "-m", "atsmail", "--config", str(config)]
            subprocess.run([*atsmail, "init"], check=True, cwd=workdir,
                           stdout=subprocess.DEVNULL)
            seed_store(config, opts.candidates)
            serve = [*atsmail, "serve", "--workers", str(opts.workers)]
            gateway, gateway_log = procs.start("gateway", serve)
            wait_for_port(relay_port, gateway, gateway_log)

            postfix = Postfix(workdir / "postfix", mta_port, relay_port)
            postfix.start(procs)
            print(f"{opts.messages} messages → Postfix :{mta_port} → atsmail :{relay_port} "
                  f"(--workers {opts.workers}) → sink :{sink_port}; {opts.kills} kills",
                  flush=True)

            load = LoadResult()
            began = time.monotonic()
            loader = asyncio.new_event_loop()
            sending = loader.create_task(run_load(
                load, mta_port, 0, opts.messages, opts.sessions, opts.size, opts.candidates,
                10, TAG))
            kills = 0
            deadline = began + opts.timeout
            while time.monotonic() < deadline:
                loader.run_until_complete(asyncio.sleep(0.05))
                if gateway.poll() is not None:
                    raise SystemExit(f"the gateway exited by itself with {gateway.returncode}:"
                                     f"\n{log_tail(gateway_log)}")
                seen = len(recorded(record))
                if kills < opts.kills and seen >= (kills + 1) * opts.messages // (opts.kills + 1):
                    kill_gateway(gateway)
                    kills += 1
                    print(f"  kill -9 #{kills} with {seen} messages at the sink", flush=True)
                    time.sleep(opts.down)
                    gateway, gateway_log = procs.start("gateway", serve)
                    wait_for_port(relay_port, gateway, gateway_log)
                if sending.done() and postfix.queued() == 0 and kills == opts.kills:
                    break
            loader.run_until_complete(asyncio.wait_for(sending, 60))
            loader.close()
            seconds = time.monotonic() - began
            left = postfix.queued()
            postfix.stop()
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
            return report(opts, load, record, workdir / "atsmail.db", kills, left, seconds,
                          gateway_log)
        finally:
            if postfix is not None:
                postfix.stop()
            procs.stop_all()


def kill_gateway(gateway: subprocess.Popen[bytes]) -> None:
    """SIGKILL the gateway and its relay workers, all at once."""
    workers = Path(f"/proc/{gateway.pid}/task/{gateway.pid}/children")
    pids = [int(p) for p in workers.read_text().split()] if workers.exists() else []
    for pid in [gateway.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    gateway.wait(10)


def report(opts: argparse.Namespace, load: LoadResult, record: Path, store: Path, kills: int,
           left: int, seconds: float, gateway_log: Path) -> int:
    sent = {f"{TAG}.{i}@bench.company.test" for i in range(opts.messages)}
    taken = load.ok
    at_sink = Counter(recorded(record))
    missing = sent - set(at_sink)
    duplicates = sum(n - 1 for n in at_sink.values() if n > 1)
    candidate = {f"{TAG}.{i}@bench.company.test" for i in range(0, opts.messages, 2)}
    rows = captures(store)
    confirmed = Counter(m for m, state, n in rows for _ in range(n) if state == "confirmed")
    pending = [m for m, state, _ in rows if state != "confirmed"]
    not_captured = candidate - set(confirmed)
    twice = [m for m, n in confirmed.items() if n > 1]
    stray = set(confirmed) - candidate

    print(f"\n{kills} kills in {seconds:.1f} s; Postfix took {taken} of {opts.messages} "
          f"messages ({load.errors} load errors); {left} still queued")
    print(f"at the sink: {len(set(at_sink))} distinct of {len(sent)}, {len(missing)} missing, "
          f"{duplicates} duplicates (the SMTP-inherent window)")
    print(f"captured: {len(confirmed)} of {len(candidate)} candidate messages, "
          f"{len(not_captured)} missing, {len(twice)} twice, {len(pending)} left pending, "
          f"{len(stray)} not candidate mail")
    # At most one duplicate per delivery in flight at each kill.
    window = kills * POSTFIX_CONCURRENCY
    if duplicates > window:
        print(f"more duplicates than deliveries in flight at the kills ({window})")
    ok = (taken == opts.messages and not missing and not not_captured and not twice
          and not pending and not stray and left == 0 and kills == opts.kills
          and duplicates <= window)
    print("verdict:", "nothing lost" if ok else "FAILED")
    if not ok:
        print(f"examples: missing {sorted(missing)[:5]}, not captured "
              f"{sorted(not_captured)[:5]}, pending {pending[:5]}", file=sys.stderr)
        print(f"gateway log (tail):\n{log_tail(gateway_log)}", file=sys.stderr)
    return 0 if ok else 1


def this_script_here(role: str, *args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), role, *map(str, args)]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=20, help="load sessions into Postfix")
    parser.add_argument("--size", type=int, default=4096, help="approximate message bytes")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="atsmail serve --workers")
    parser.add_argument("--down", type=float, default=0.5,
                        help="seconds the gateway stays dead each time")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="give up (and fail) after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "_sink":
        run_recording_sink(int(argv[1]), Path(argv[2]))
        return 0
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
